"""``send_message``: one message to one server, the one-call API for applications.

Like aiosmtplib's ``send``: an ``EmailMessage`` (envelope taken from its
headers, Bcc removed) or raw bytes with an explicit envelope, delivered over
one :class:`~trio_mta.client.connection.SMTPClient` session.
"""

from __future__ import annotations

import copy
import email.message
import email.utils
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from trio_mta.client.connection import SMTPClient, SMTPSendError, Timeouts, TLSMode
from trio_mta.smtp.replies import Reply

__all__ = ["SendResult", "send_message"]


@dataclass(frozen=True)
class SendResult:
    """What :func:`send_message` achieved: per recipient the deciding reply."""

    recipients: Mapping[str, Reply]
    reply: Reply | None  # the reply to the message data; None when DATA was not reached
    peer: str
    tls: str | None

    @property
    def accepted(self) -> tuple[str, ...]:
        return tuple(rcpt for rcpt, reply in self.recipients.items() if reply.is_success)

    @property
    def refused(self) -> dict[str, Reply]:
        return {rcpt: reply for rcpt, reply in self.recipients.items() if not reply.is_success}


async def send_message(
    message: bytes | email.message.Message,
    *,
    sender: str | None = None,
    recipients: Sequence[str] | None = None,
    host: str = "localhost",
    port: int = 25,
    tls: TLSMode = "opportunistic",
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    username: str | None = None,
    password: str | None = None,
    helo_name: str | None = None,
    timeouts: Timeouts | None = None,
) -> SendResult:
    """Send one message to ``host:port`` (an MX, a smarthost or a submission server).

    For an ``EmailMessage``, ``sender`` defaults to its Sender or From address
    and ``recipients`` to every To, Cc and Bcc address; Bcc is removed before
    sending (RFC 5322 §3.6.3), without changing the caller's object. Raw bytes
    need both and are sent as given (after CRLF normalisation and
    dot-stuffing). ``username``/``password`` log in with AUTH, which needs TLS
    unless ``tls="none"``. ``helo_name`` defaults to this machine's host name.

    Raises an :class:`SMTPClientError` when nothing was delivered (every
    recipient refused: :class:`SMTPSendError`); otherwise returns the replies,
    refused recipients included.
    """
    data, envelope_from, envelope_to = _prepare(message, sender, recipients)
    if (username is None) != (password is None):
        raise ValueError("username and password go together")
    client = await SMTPClient.connect(
        host,
        port,
        helo_name=helo_name or socket.gethostname(),
        tls=tls,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        timeouts=timeouts,
    )
    async with client:
        if username is not None and password is not None:
            await client.login(username, password)
        transaction = await client.send(envelope_from, envelope_to, data)
    result = SendResult(
        recipients=dict(zip(envelope_to, transaction.outcomes, strict=True)),
        reply=transaction.data_reply,
        peer=client.peer,
        tls=client.tls,
    )
    if not result.accepted:
        raise SMTPSendError(f"{client.peer} accepted no recipient", result)
    return result


def _prepare(
    message: bytes | email.message.Message,
    sender: str | None,
    recipients: Sequence[str] | None,
) -> tuple[bytes, str, list[str]]:
    """(wire bytes, envelope sender, envelope recipients) for send_message."""
    if isinstance(message, bytes | bytearray | memoryview):
        if sender is None or recipients is None:
            raise ValueError("raw message bytes need sender= and recipients=")
        data = bytes(message)
    else:
        if sender is None:
            found = _addresses(message, "Sender") or _addresses(message, "From")
            if not found:
                raise ValueError("no sender: pass sender= or give the message a From header")
            sender = found[0]
        if recipients is None:
            recipients = list(
                dict.fromkeys(a for h in ("To", "Cc", "Bcc") for a in _addresses(message, h))
            )
        if "Bcc" in message:
            message = copy.deepcopy(message)
            del message["Bcc"]
        data = bytes(message.as_bytes(policy=message.policy.clone(linesep="\r\n")))
    if not recipients:
        raise ValueError("no recipients: pass recipients= or give the message To/Cc/Bcc")
    return data, sender, list(recipients)


def _addresses(message: email.message.Message, header: str) -> list[str]:
    values = [str(value) for value in message.get_all(header, [])]
    return [address for _, address in email.utils.getaddresses(values) if address]
