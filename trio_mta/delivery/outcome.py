"""What one delivery attempt of one recipient came to, as data.

An :class:`Outcome` is what an agent reports and what the queue stores, field
by field (kind, reply code, enhanced status, text, remote host, stage), so the
bouncer and ``queue show`` never parse text to learn what happened. It imports
nothing from the rest of trio_mta: the agents, the scheduler and the store all
speak it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

__all__ = ["STAGES", "Kind", "Outcome", "Stage", "status_in"]

Kind = Literal["delivered", "deferred", "failed"]
# Where the attempt ended: connecting, the session before a transaction
# (greeting, EHLO, STARTTLS, AUTH), a transaction step, DNS, our own routing
# checks, local delivery, or the queue itself (expiry, an agent's crash).
Stage = Literal[
    "connect",
    "greeting",
    "ehlo",
    "tls",
    "auth",
    "mail",
    "rcpt",
    "data",
    "dns",
    "route",
    "local",
    "queue",
]
STAGES: Final = frozenset(get_args(Stage))
_STATUS: Final = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")  # RFC 3463 §2


@dataclass(frozen=True)
class Outcome:
    """One recipient's result. ``code`` is set only when an SMTP server replied.

    ``status`` is the RFC 3463 code (``"4.4.1"``); ``text`` is the reply text
    without code and status, or our own explanation; ``remote_host`` and
    ``remote_address`` name the MTA that gave the reply (or, when nothing
    answered, the one address that was tried).
    """

    kind: Kind
    status: str
    text: str
    code: int | None = None
    remote_host: str | None = None
    remote_address: str | None = None
    stage: Stage | None = None
    # Delivered to a next hop that advertised DSN and got our RFC 3461 parameters:
    # any success notice is its to send (RFC 3461 §6.2.1); not stored.
    dsn_passed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("delivered", "deferred", "failed"):
            raise ValueError(f"unknown outcome kind {self.kind!r}")
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"status must be an RFC 3463 code like 4.4.1, got {self.status!r}")
        if self.stage is not None and self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}")

    @property
    def peer(self) -> str | None:
        """``mx1.example.org[192.0.2.1]``, the form Postfix logs, or None."""
        if self.remote_host and self.remote_address:
            return f"{self.remote_host}[{self.remote_address}]"
        return self.remote_host or self.remote_address

    @property
    def reply(self) -> str:
        """Code, status and text: ``550 5.1.1 user unknown`` or ``4.4.1 no answer``."""
        head = f"{self.code} {self.status}" if self.code is not None else self.status
        return f"{head} {self.text}" if self.text else head

    @property
    def detail(self) -> str:
        """One line for people and the logs: the reply, then who said it and when."""
        peer = self.peer
        if peer is None:
            return self.reply
        if self.stage is None or self.kind == "delivered":
            return f"{self.reply} ({peer})"
        return f"{self.reply} ({peer}, {self.stage})"


def status_in(text: str | None) -> str | None:
    """The first RFC 3463 code in ``text`` (for rows stored before outcomes had fields)."""
    match = _STATUS.search(text or "")
    return ".".join(match.groups()) if match else None
