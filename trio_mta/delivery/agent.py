"""The delivery-agent interface: what the scheduler hands an agent and what it gets back.

An agent (Maildir, remote SMTP) receives due items and returns one
:class:`Outcome` per item, in order. Outcomes are data the queue can act on
without parsing text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from trio_mta.queue.store import DueRecipient

__all__ = ["DeliveryAgent", "DeliveryItem", "DestinationLimited", "Outcome"]


@dataclass(frozen=True)
class DeliveryItem:
    rcpt: DueRecipient
    data: bytes  # shared between recipients of one message: fetched once per batch


@dataclass(frozen=True)
class Outcome:
    kind: Literal["delivered", "deferred", "failed"]
    detail: str  # reply text with enhanced status code, e.g. "451 4.3.0 try later"


@runtime_checkable
class DestinationLimited(Protocol):
    """An agent with per-destination limits tells the scheduler when one is full."""

    def saturated(self, domain: str) -> bool: ...


class DeliveryAgent(Protocol):
    async def deliver(self, items: Sequence[DeliveryItem]) -> Sequence[Outcome]:
        """Deliver each item; return one Outcome per item, in the same order."""
        ...
