"""Exceptions of the sans-IO SMTP core.

Everything in ``trio_mta.smtp`` that rejects *input* raises a subclass of
:class:`SMTPProtocolError`, so a caller needs one ``except`` clause around the
machine and never sees ``IndexError``/``ValueError`` from a hostile peer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trio_mta.smtp.replies import Reply


class SMTPProtocolError(Exception):
    """Bad protocol input; ``reply`` is what a server should answer, when known."""

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class CommandError(SMTPProtocolError):
    """A command line the server must refuse; ``reply`` is always set."""

    reply: Reply

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply), reply)


class ReplyError(SMTPProtocolError):
    """A malformed or missing server reply (client side)."""


class LocalProtocolError(SMTPProtocolError, RuntimeError):
    """The caller used the API out of order (h11's name for the same idea)."""
