"""The client side of an SMTP conversation as a sans-IO state machine.

The conversation is a series of *steps*. A step method (``ehlo()``,
``start_tls()``, ``authenticate()``, ``send_mail()``, ``rset()``, ``noop()``,
``quit()``) queues the bytes to send; the step's typed result then comes out
of ``next_event()`` once enough replies were fed in. The greeting is the
first step and starts by itself. One step at a time; inside a step the
machine sends what it must on its own (HELO after a refused EHLO, SASL
continuations, the message body after 354). A trio loop drives any step the
same way::

    async def run_step(stream: trio.abc.Stream, conn: ClientConnection) -> ClientEvent:
        while True:
            event = conn.next_event()      # first: a fed reply may queue the next command
            if out := conn.data_to_send():
                await stream.send_all(out)
            if event is not NEED_DATA:
                return event
            conn.receive_data(await stream.receive_some(65536))   # b"" on EOF

(``next_event()`` comes before ``data_to_send()``: without PIPELINING the RCPT
after MAIL is only queued once the MAIL reply has been processed, and a loop
that waits for input first would wait for a reply to a command never sent.)

    conn = ClientConnection(helo_name="relay.example")
    greeting = await run_step(stream, conn)            # Greeting
    conn.ehlo(); hello = await run_step(stream, conn)  # HelloResult; capabilities now known
    if conn.starttls:
        conn.start_tls()
        if (await run_step(stream, conn)).reply.code == 220:
            stream = wrap_in_tls(stream)
            conn.tls_established()                      # re-sends EHLO
            await run_step(stream, conn)                # HelloResult
    conn.send_mail("a@example.org", ["b@example.net"], message_bytes)
    result = await run_step(stream, conn)               # TransactionResult
    result.outcomes                                     # the deciding Reply per recipient

With PIPELINING (RFC 2920) ``send_mail`` writes MAIL, every RCPT and DATA at
once and matches the replies in order; the body follows only after 354. A
421 reply means the server is closing (RFC 5321 §3.8): the replies still
expected for pipelined commands are taken to be that 421. A missing reply at
EOF or a garbled one raises :class:`ReplyError`.

LMTP (RFC 2033): ``ClientConnection(helo_name=..., lmtp=True)`` says LHLO
instead of EHLO (no HELO fallback: LMTP has none) and, after the message
data, reads one reply per accepted RCPT, in RCPT order (§4.2): they are
``TransactionResult.data_replies`` and decide those recipients' outcomes.

MAIL carries SIZE, BODY=8BITMIME (8-bit body) and SMTPUTF8 (non-ASCII
address) when the server offers them. A message over the server's SIZE, or
needing SMTPUTF8 that is not offered (RFC 6531 §3.2), is refused locally with
a synthetic 552 5.3.4 / 553 5.6.7 and nothing is sent. An 8-bit body goes to a
server without 8BITMIME unchanged: converting MIME is not this layer's job,
and ``eightbitmime`` lets the caller decide beforehand.
"""

from __future__ import annotations

import base64
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from trio_mta.smtp.address import Path, parse_path
from trio_mta.smtp.commands import (
    MAX_LINE,
    Auth,
    Command,
    Data,
    Ehlo,
    Helo,
    Mail,
    MailParams,
    Noop,
    Quit,
    Rcpt,
    RcptParams,
    Ret,
    Rset,
    StartTls,
    format_command,
)
from trio_mta.smtp.data import dot_stuff
from trio_mta.smtp.errors import CommandError, LocalProtocolError, ReplyError
from trio_mta.smtp.events import NEED_DATA, NeedData
from trio_mta.smtp.replies import Reply, ReplyParser

__all__ = [
    "NEED_DATA",
    "AuthResult",
    "ClientConnection",
    "ClientEvent",
    "CommandResult",
    "DsnRequest",
    "Greeting",
    "HelloResult",
    "StartTlsResult",
    "TransactionResult",
]


@dataclass(frozen=True)
class DsnRequest:
    """RFC 3461 parameters for one transaction: RET and ENVID, one RcptParams per recipient."""

    recipients: tuple[RcptParams, ...]
    ret: Ret | None = None
    envid: str | None = None


@dataclass(frozen=True)
class Greeting:
    reply: Reply


@dataclass(frozen=True)
class HelloResult:
    """The EHLO reply, or the HELO reply after EHLO was refused (``esmtp`` False)."""

    reply: Reply
    esmtp: bool


@dataclass(frozen=True)
class StartTlsResult:
    """220: wrap the stream in TLS now, then call ``tls_established()``."""

    reply: Reply


@dataclass(frozen=True)
class AuthResult:
    reply: Reply


@dataclass(frozen=True)
class CommandResult:
    """Result of RSET, NOOP or QUIT."""

    reply: Reply


@dataclass(frozen=True)
class TransactionResult:
    """Replies of one MAIL/RCPT/DATA transaction.

    ``rcpt_replies[i]`` is None when RCPT was never sent for recipient i (MAIL
    refused without pipelining); ``data_reply`` is the final reply to the
    message, or the refusal of DATA itself, or None when DATA was not reached.
    In LMTP ``data_replies[i]`` is recipient i's own reply after the data (None
    for a refused RCPT); it is empty in SMTP and when the data was not sent.
    Locally refused messages (too big for the server's SIZE, SMTPUTF8 needed
    but not offered) get a synthetic ``mail_reply`` and nothing is sent.
    """

    mail_reply: Reply
    rcpt_replies: tuple[Reply | None, ...]
    data_reply: Reply | None
    data_replies: tuple[Reply | None, ...] = ()

    @property
    def outcomes(self) -> tuple[Reply, ...]:
        """Per recipient, the reply that decided its fate (2xx: delivered)."""
        out = []
        for i, rcpt in enumerate(self.rcpt_replies):
            lmtp = self.data_replies[i] if self.data_replies else None
            if lmtp is not None:
                out.append(lmtp)
            elif not self.mail_reply.is_success:
                out.append(self.mail_reply)
            elif rcpt is None or not rcpt.is_success or self.data_reply is None:
                out.append(rcpt or self.mail_reply)
            else:
                out.append(self.data_reply)
        return tuple(out)


ClientEvent: TypeAlias = (
    Greeting | HelloResult | StartTlsResult | AuthResult | CommandResult | TransactionResult
)
# A step yields how many replies it waits for and receives them as a list.
_Step = Generator[int, list[Reply], ClientEvent]


class ClientConnection:
    """One SMTP session, client side. See the module docstring for the loop."""

    def __init__(self, *, helo_name: str, lmtp: bool = False) -> None:
        self._helo_name = helo_name
        self.lmtp = lmtp
        self._parser = ReplyParser()
        self._out: list[bytes] = []
        self._eof = False
        self._closed = False
        self._step: _Step | None = None
        self._want = 0
        self._got: list[Reply] = []
        self._ready: ClientEvent | None = None
        self._tls = False
        self._tls_pending = False
        self._needs_rset = False
        self.greeting: Reply | None = None
        self.esmtp = False
        self.extensions: dict[str, str] = {}
        self.discarded_plaintext = b""
        self._start(self._greeting_step())

    # ------------------------------------------------------------ capabilities
    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def closed(self) -> bool:
        """The server said 421 or QUIT was answered: no further steps."""
        return self._closed

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def dsn(self) -> bool:
        """The server takes RFC 3461 parameters: it reports from here on."""
        return "DSN" in self.extensions

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.extensions

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.extensions

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.extensions

    @property
    def chunking(self) -> bool:
        return "CHUNKING" in self.extensions

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(self.extensions.get("AUTH", "").upper().split())

    @property
    def max_size(self) -> int | None:
        """RFC 1870 SIZE limit; None when not advertised or 0 (no fixed limit)."""
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isascii() and value.isdigit() and int(value) else None

    # -------------------------------------------------------------- driving
    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; ``b""`` means EOF."""
        if not data:
            self._eof = True
        else:
            self._parser.feed(data)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> ClientEvent | NeedData:
        """The current step's result, or NEED_DATA until its replies arrived."""
        if self._ready is not None:
            ready, self._ready = self._ready, None
            return ready
        step = self._step
        if step is None:
            raise LocalProtocolError("no step in progress")
        while True:
            while len(self._got) < self._want:
                reply = self._parser.next_reply()
                if reply is None:
                    if self._eof:
                        self._closed = True
                        raise ReplyError("connection closed while waiting for a reply")
                    return NEED_DATA
                self._got.append(reply)
                if reply.code == 421:
                    # RFC 5321 §3.8: the server is closing; no further replies will come.
                    self._closed = True
                    self._got.extend([reply] * (self._want - len(self._got)))
            got, self._got = self._got, []
            try:
                self._want = step.send(got)
            except StopIteration as stop:
                self._step = None
                result: ClientEvent = stop.value
                return result

    # ----------------------------------------------------------------- steps
    def ehlo(self) -> None:
        self._start(self._ehlo_step())

    def start_tls(self) -> None:
        """RFC 3207: send STARTTLS; on 220 wrap the stream and call tls_established()."""
        self._start(self._starttls_step())

    def tls_established(self) -> None:
        """The handshake succeeded: drop pre-TLS leftovers, forget capabilities, EHLO again."""
        if not self._tls_pending:
            raise LocalProtocolError("tls_established() without a 220 to STARTTLS")
        self._tls_pending = False
        self._tls = True
        # Anything the server "said" after 220 but before TLS is an injection.
        self.discarded_plaintext = self._parser.clear()
        self._start(self._ehlo_step())

    def authenticate(self, mechanism: str, username: str, password: str, authzid: str = "") -> None:
        """RFC 4954 AUTH with PLAIN (RFC 4616) or LOGIN."""
        mechanism = mechanism.upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            raise LocalProtocolError(f"unsupported SASL mechanism {mechanism!r}")
        self._start(self._auth_step(mechanism, username, password, authzid))

    def send_mail(
        self,
        sender: str | Path,
        recipients: Sequence[str | Path],
        body: bytes,
        *,
        smtputf8: bool | None = None,
        dsn: DsnRequest | None = None,
    ) -> None:
        """One transaction; ``body`` is the RFC 5322 message (any line ends).

        ``smtputf8``: request SMTPUTF8; by default when an address is not ASCII.
        ``dsn``: RFC 3461 RET/ENVID and per-recipient NOTIFY/ORCPT, sent only
        when the server advertised DSN (§5: never to one that did not).
        """
        if dsn is not None and len(dsn.recipients) != len(recipients):
            raise LocalProtocolError("send_mail() needs one RcptParams per recipient")
        mail_from = _path(sender, null_ok=True)
        rcpt_to = [_path(rcpt, null_ok=False) for rcpt in recipients]
        if not rcpt_to:
            raise LocalProtocolError("send_mail() needs at least one recipient")
        if smtputf8 is None:
            smtputf8 = not all(str(p).isascii() for p in (mail_from, *rcpt_to))
        self._start(self._mail_step(mail_from, rcpt_to, body, smtputf8, dsn if self.dsn else None))

    def rset(self) -> None:
        self._start(self._simple_step(Rset()))

    def noop(self) -> None:
        self._start(self._simple_step(Noop()))

    def quit(self) -> None:
        self._start(self._simple_step(Quit()))

    # ------------------------------------------------------------- internals
    def _start(self, step: _Step) -> None:
        if self._step is not None or self._ready is not None:
            raise LocalProtocolError("the previous step has not finished")
        if self._closed:
            raise LocalProtocolError("the connection is closed")
        if self._tls_pending:
            raise LocalProtocolError("call tls_established() after the 220 to STARTTLS")
        try:
            self._want = next(step)
        except StopIteration as stop:
            self._ready = stop.value
            return
        self._step = step
        self._got = []

    def _send(self, cmd: Command) -> None:
        self._out.append(format_command(cmd))

    def _greeting_step(self) -> _Step:
        (reply,) = yield 1
        self.greeting = reply
        return Greeting(reply)

    def _ehlo_step(self) -> _Step:
        self.esmtp = False
        self.extensions = {}
        line = format_command(Ehlo(self._helo_name))
        self._out.append(b"LHLO" + line[4:] if self.lmtp else line)  # RFC 2033 §4.1
        (reply,) = yield 1
        if reply.is_success:
            self.esmtp = True
            self.extensions = _parse_extensions(reply)
            return HelloResult(reply, True)
        if reply.code >= 500 and not self.lmtp:
            # RFC 5321 §3.2: a server that does not know EHLO still knows HELO.
            self._send(Helo(self._helo_name))
            (reply,) = yield 1
        return HelloResult(reply, False)

    def _starttls_step(self) -> _Step:
        self._send(StartTls())
        (reply,) = yield 1
        if reply.code == 220:
            self._tls_pending = True
        return StartTlsResult(reply)

    def _auth_step(self, mechanism: str, username: str, password: str, authzid: str) -> _Step:
        if mechanism == "PLAIN":
            token = _b64(f"{authzid}\0{username}\0{password}")
            if len(token) + len("AUTH PLAIN \r\n") <= MAX_LINE:
                self._send(Auth("PLAIN", token))  # RFC 4954 §4 initial response
                (reply,) = yield 1
            else:
                self._send(Auth("PLAIN"))
                (reply,) = yield 1
                if reply.code == 334:
                    reply = yield from self._sasl_response(token)
        else:
            self._send(Auth("LOGIN"))
            (reply,) = yield 1
            for secret in (username, password):
                if reply.code != 334:
                    break
                reply = yield from self._sasl_response(_b64(secret))
        if reply.code == 334:
            # A server asking for more than the mechanism has: cancel (RFC 4954 §4).
            self._out.append(b"*\r\n")
            (reply,) = yield 1
        return AuthResult(reply)

    def _sasl_response(self, token: str) -> Generator[int, list[Reply], Reply]:
        self._out.append(token.encode("ascii") + b"\r\n")
        (reply,) = yield 1
        return reply

    def _simple_step(self, cmd: Rset | Noop | Quit) -> _Step:
        self._send(cmd)
        (reply,) = yield 1
        if isinstance(cmd, Rset) and reply.is_success:
            self._needs_rset = False
        if isinstance(cmd, Quit):
            self._closed = True
        return CommandResult(reply)

    def _mail_step(
        self,
        sender: Path,
        recipients: list[Path],
        body: bytes,
        smtputf8: bool,
        dsn: DsnRequest | None,
    ) -> _Step:
        count = len(recipients)
        if smtputf8 and not self.smtputf8:
            refusal = Reply(553, "5.6.7", "Server does not support SMTPUTF8 addresses")
            return TransactionResult(refusal, (None,) * count, None)  # RFC 6531 §3.2
        wire = dot_stuff(body)
        size = len(wire) - 3
        limit = self.max_size
        if limit is not None and size > limit:
            refusal = Reply(552, "5.3.4", f"Message too big for the server (limit {limit})")
            return TransactionResult(refusal, (None,) * count, None)  # RFC 1870 §6
        params = MailParams()
        if self.esmtp:
            eight_bit = self.eightbitmime and not body.isascii()
            params = MailParams(
                size=size if "SIZE" in self.extensions else None,
                body="8BITMIME" if eight_bit else None,  # RFC 6152 §3
                smtputf8=smtputf8,
                ret=dsn.ret if dsn is not None else None,
                envid=dsn.envid if dsn is not None else None,
            )
        rcpt_params = list(dsn.recipients) if dsn is not None else [RcptParams()] * count
        rset = self._needs_rset
        self._needs_rset = True  # until the transaction provably ended on the server
        if rset:
            self._send(Rset())
        if self.pipelining:
            # RFC 2920 §3.1: MAIL, RCPTs and DATA in one group, DATA last.
            self._send(Mail(sender, params))
            for rcpt, rcpt_param in zip(recipients, rcpt_params, strict=True):
                self._send(Rcpt(rcpt, rcpt_param))
            self._send(Data())
            replies = yield int(rset) + count + 2
            replies = replies[int(rset) :]
            mail_reply, data_cmd_reply = replies[0], replies[-1]
            rcpt_replies: list[Reply | None] = list(replies[1:-1])
        else:
            if rset:
                yield 1
            self._send(Mail(sender, params))
            (mail_reply,) = yield 1
            rcpt_replies = []
            for rcpt, rcpt_param in zip(recipients, rcpt_params, strict=True):
                if not mail_reply.is_success:
                    rcpt_replies.append(None)
                    continue
                self._send(Rcpt(rcpt, rcpt_param))
                (reply,) = yield 1
                rcpt_replies.append(reply)
            if not any(r is not None and r.is_success for r in rcpt_replies):
                return TransactionResult(mail_reply, tuple(rcpt_replies), None)
            self._send(Data())
            (data_cmd_reply,) = yield 1
        if data_cmd_reply.code != 354:
            return TransactionResult(mail_reply, tuple(rcpt_replies), data_cmd_reply)
        usable = mail_reply.is_success and any(r is not None and r.is_success for r in rcpt_replies)
        # RFC 2920 §3.1: DATA accepted without valid recipients: send an empty message.
        self._out.append(wire if usable else b".\r\n")
        accepted = [i for i, r in enumerate(rcpt_replies) if r is not None and r.is_success]
        if not (self.lmtp and usable):
            (final,) = yield 1
            self._needs_rset = False
            return TransactionResult(mail_reply, tuple(rcpt_replies), final if usable else None)
        # RFC 2033 §4.2: one reply per accepted RCPT, in order (none for an empty message).
        finals = yield len(accepted)
        self._needs_rset = False
        per_rcpt: list[Reply | None] = [None] * count
        for i, reply in zip(accepted, finals, strict=True):
            per_rcpt[i] = reply
        return TransactionResult(mail_reply, tuple(rcpt_replies), finals[-1], tuple(per_rcpt))


def _path(address: str | Path, *, null_ok: bool) -> Path:
    if isinstance(address, Path):
        address = str(address)
    try:
        return parse_path(f"<{address}>", smtputf8=True, allow_null=null_ok)
    except CommandError as exc:
        raise LocalProtocolError(f"invalid address {address!r}: {exc.reply.text}") from None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO lines after the first: ``KEYWORD [params]`` (RFC 5321 §4.1.1.1).

    The keyword ends at the first white space of any kind, as the stripping of
    the line's ends already assumes: a ``SIZE<TAB>1000`` is SIZE, not a keyword
    with a tab in it.
    """
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, params = [*line.split(None, 1), "", ""][:2]
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            # Pre-RFC 4954 servers advertise "AUTH=LOGIN PLAIN" as well.
            params, keyword = f"{keyword[5:]} {params}", "AUTH"
        if keyword == "AUTH" and "AUTH" in extensions:
            params = f"{extensions['AUTH']} {params}"
        if keyword:
            extensions[keyword] = params.strip()
    return extensions
