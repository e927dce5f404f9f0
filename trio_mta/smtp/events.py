"""Events of the server conversation (h11 style: frozen dataclasses).

DECISION events (:class:`MailFrom`, :class:`RcptTo`, :class:`EndOfMessage`,
:class:`StartTlsRequest`, :class:`AuthAttempt`) stop the machine until the
caller answers with exactly one ``send_reply``. The others are informational:
the machine has already queued whatever reply they needed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from trio_mta.smtp.address import Path
from trio_mta.smtp.commands import MailParams, Quit, RcptParams
from trio_mta.smtp.replies import Reply


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


#: Returned by ``next_event`` when the machine needs more bytes (or is paused for TLS).
NEED_DATA: Final = _Sentinel.NEED_DATA
NeedData: TypeAlias = Literal[_Sentinel.NEED_DATA]


@dataclass(frozen=True)
class MailFrom:
    """Decision: a 2xx reply opens the transaction."""

    path: Path
    params: MailParams


@dataclass(frozen=True)
class RcptTo:
    """Decision: a 2xx reply adds the recipient."""

    path: Path
    params: RcptParams = field(default_factory=RcptParams)


@dataclass(frozen=True)
class EndOfMessage:
    """Decision: the message is complete and clean; the transaction ends whatever the reply."""

    size: int


@dataclass(frozen=True)
class StartTlsRequest:
    """Decision: 220 makes the machine drop buffered plaintext and wait for TLS."""


@dataclass(frozen=True)
class AuthAttempt:
    """Decision: 235 authenticates ``username``. The password never appears in repr()."""

    mechanism: str
    authzid: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Hello:
    """EHLO/HELO was answered; any transaction was reset."""

    esmtp: bool
    name: str


@dataclass(frozen=True)
class TransactionReset:
    """Drop the envelope: RSET, a new EHLO/HELO, or the end of a transaction."""


@dataclass(frozen=True)
class DataStarted:
    """354 was queued or the first BDAT chunk arrived: switch to the data timeout."""


@dataclass(frozen=True)
class BodyChunk:
    """Unstuffed message bytes with CRLF line ends, in order."""

    data: bytes = field(repr=False)


@dataclass(frozen=True)
class MessageRefused:
    """The machine refused the message itself and queued ``reply``; transaction over."""

    reply: Reply


@dataclass(frozen=True)
class ConnectionClosed:
    """Peer EOF, or the machine gave up (421 queued). Nothing more will happen."""


# ``Quit`` (221 queued; flush and close) is the QUIT command class itself.

DECISIONS = (MailFrom, RcptTo, EndOfMessage, StartTlsRequest, AuthAttempt)

Event: TypeAlias = (
    MailFrom
    | RcptTo
    | EndOfMessage
    | StartTlsRequest
    | AuthAttempt
    | Hello
    | TransactionReset
    | DataStarted
    | BodyChunk
    | MessageRefused
    | Quit
    | ConnectionClosed
)

__all__ = [
    "DECISIONS",
    "NEED_DATA",
    "AuthAttempt",
    "BodyChunk",
    "ConnectionClosed",
    "DataStarted",
    "EndOfMessage",
    "Event",
    "Hello",
    "MailFrom",
    "MessageRefused",
    "NeedData",
    "Quit",
    "RcptTo",
    "StartTlsRequest",
    "TransactionReset",
]
