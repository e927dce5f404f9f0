"""The delivery-agent interface: what the scheduler hands an agent and what it gets back.

An agent (Maildir, remote SMTP) receives due items and returns one
:class:`~trio_mta.delivery.outcome.Outcome` per item, in order. Outcomes are
data the queue can act on without parsing text. Grouping by destination and
concurrency limits belong to the scheduler: an agent delivers the batch it is
given, as soon as it is given it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from trio_mta.delivery.outcome import Outcome
from trio_mta.queue.bodies import StoredBody
from trio_mta.queue.store import DueRecipient

__all__ = ["DeliveryAgent", "DeliveryItem", "Outcome"]


@dataclass(frozen=True)
class DeliveryItem:
    rcpt: DueRecipient
    # Shared between recipients of one message: fetched once per batch. A large
    # body is a file (StoredBody.path): agents read it in pieces or in a thread.
    body: StoredBody | bytes

    @property
    def stored(self) -> StoredBody:
        return StoredBody(self.body) if isinstance(self.body, bytes) else self.body

    @property
    def data(self) -> bytes:
        """The whole message in memory; reads a body file, so call it from a thread."""
        return self.body if isinstance(self.body, bytes) else self.body.read()


class DeliveryAgent(Protocol):
    async def deliver(self, items: Sequence[DeliveryItem]) -> Sequence[Outcome]:
        """Deliver each item; return one Outcome per item, in the same order."""
        ...
