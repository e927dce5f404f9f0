"""Per-connection facts (``SessionInfo``) and per-transaction state (``Envelope``).

The split mirrors aiosmtpd's Session/Envelope, which is what embedders know:
a session outlives many transactions, an envelope lives from MAIL to the end
of DATA (or RSET).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from trio_mta.queue.bodies import MessageContent
from trio_mta.routing.router import Target
from trio_mta.smtp import MailParams, Path, RcptParams, Reply


@dataclass(frozen=True)
class SessionInfo:
    """What is known about the client when a message is accepted."""

    listener_mode: str
    client_ip: str
    client_port: int
    helo: str | None
    esmtp: bool
    tls: str | None
    auth_user: str | None
    trusted: bool


@dataclass
class Recipient:
    """One RCPT as the client wrote it, and where routing sends it."""

    address: str
    targets: tuple[Target, ...]
    params: RcptParams = field(default_factory=RcptParams)  # RFC 3461 NOTIFY, ORCPT


@dataclass
class Envelope:
    sender: Path
    params: MailParams
    recipients: list[Recipient] = field(default_factory=list)

    @property
    def sender_address(self) -> str:
        return str(self.sender)


class MessageSink(Protocol):
    """Where an accepted message goes: the durable queue, or an application handler.

    ``accept`` returns the reply for the end of DATA. A 250 must only be
    returned once the message is safe (for the queue: fsynced). A large body
    arrives as a spool file (``content.body`` is a SpooledBody) that the sink
    may take over by renaming it; the session removes it otherwise.
    """

    async def accept(
        self, envelope: Envelope, session: SessionInfo, content: MessageContent, queue_id: str
    ) -> Reply: ...
