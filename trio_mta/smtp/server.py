"""The server side of an SMTP conversation as a sans-IO state machine.

Usage (the trio glue lives in ``trio_mta/server/``)::

    conn = ServerConnection(hostname="mx.example", max_message_size=..., ...)
    conn.send_reply(Reply(220, None, "mx.example ESMTP"))     # the banner comes first
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            await stream.send_all(conn.data_to_send())
            conn.receive_data(await stream.receive_some(65536))   # b"" on EOF
        elif isinstance(event, MailFrom):
            conn.send_reply(policy_decision(event))               # exactly one reply
        ...

The machine answers everything it can decide alone (syntax, sequence, limits,
EHLO, NOOP, ...) and turns the rest into DECISION events. It never reads past
a pending decision, so replies leave in command order (RFC 2920 §3) and
nothing after STARTTLS is parsed before the caller has answered it (RFC 3207
§4, CVE-2011-0411). Input is kept as one ``bytes`` plus an offset: each line
is found with one ``find`` from where the last one ended, and leftovers are
only ever a partial line, so there is neither rescanning nor quadratic
concatenation. DATA is streamed out as :class:`BodyChunk` events.

Client mistakes (syntax, sequence, bare CR/LF, over-long lines) count toward
``max_errors``, after which the machine queues 421 4.7.0 and closes; policy
refusals (the caller's replies, 452 past max_recipients, 552, 554, 538) do
not, so a legitimate client with many refused recipients is not cut off.
Also: ``close(reply)`` queues the caller's own last reply (421 on a timeout)
and stops; ``awaiting_tls``, ``pending_decision`` and ``in_transaction`` expose
state a session may want for logging and timeouts.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections import deque
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from trio_mta.smtp.commands import (
    MAX_LINE,
    MAX_MAIL_LINE,
    Auth,
    Bdat,
    Command,
    Data,
    Ehlo,
    Helo,
    Help,
    Mail,
    MailParams,
    Noop,
    Quit,
    Rcpt,
    Rset,
    StartTls,
    Vrfy,
    max_line_length,
    parse_command,
)
from trio_mta.smtp.data import DataReader, LineEndingChecker
from trio_mta.smtp.errors import CommandError, LocalProtocolError
from trio_mta.smtp.events import (
    NEED_DATA,
    AuthAttempt,
    BodyChunk,
    ConnectionClosed,
    DataStarted,
    EndOfMessage,
    Event,
    Hello,
    MailFrom,
    MessageRefused,
    NeedData,
    RcptTo,
    StartTlsRequest,
    TransactionReset,
)
from trio_mta.smtp.replies import Reply

__all__ = ["NEED_DATA", "ServerConnection"]

#: RFC 4954 §4: SASL response lines may be up to 12288 octets.
MAX_SASL_LINE = 12288
#: How much discarded pre-TLS plaintext is kept for the log.
MAX_PENDING_PLAINTEXT = 4096
SUPPORTED_MECHANISMS = ("PLAIN", "LOGIN")

_OK = Reply(250, "2.0.0", "Ok")
_BARE_LINE_END = Reply(500, "5.5.2", "Bare CR or LF in command line")
_TOO_LONG = Reply(500, "5.5.2", "Line too long")
_SASL_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
_NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
_NEED_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
_BDAT_OPEN = Reply(503, "5.5.1", "Error: BDAT transfer in progress")
_NO_RCPT = Reply(554, "5.5.1", "Error: no valid recipients")
_TOO_MANY_RCPT = Reply(452, "4.5.3", "Error: too many recipients")
_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
_BARE_IN_DATA = Reply(550, "5.5.2", "Message refused: bare CR or LF in message data")
_NO_PARAMS = Reply(555, "5.5.4", "ESMTP parameters require EHLO")
_NO_BINARYMIME = Reply(555, "5.5.4", "BODY=BINARYMIME not supported")
_START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
_BYE = Reply(221, "2.0.0", "Bye")
_HELP = Reply(214, "2.0.0", "See RFC 5321")
_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
_NO_SERVICE = Reply(503, "5.5.1", "Error: no SMTP service here")
_NO_TLS = Reply(502, "5.5.1", "Error: command not implemented")
_TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
_NO_AUTH = Reply(502, "5.5.1", "Error: authentication not enabled")
_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
_AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
_UNKNOWN_MECH = Reply(504, "5.5.4", "Unrecognized authentication type")
_AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
_BAD_BASE64 = Reply(501, "5.5.2", "Invalid base64 data")
_BAD_SASL = Reply(501, "5.5.2", "Invalid authentication response")
_SASL_EMPTY = Reply(334, None, "")
_SASL_USERNAME = Reply(334, None, "VXNlcm5hbWU6")  # "Username:", RFC 4954 practice for LOGIN
_SASL_PASSWORD = Reply(334, None, "UGFzc3dvcmQ6")  # "Password:"


@lru_cache(maxsize=512)
def _wire(reply: Reply) -> bytes:
    return reply.format()


class _Phase(enum.Enum):
    BANNER = "banner"  # nothing parsed until the caller sent the greeting
    COMMAND = "command"
    DISCARD = "discard"  # dropping an over-long line up to its LF
    SASL = "sasl"  # reading an AUTH continuation line
    DATA = "data"  # after 354
    BDAT = "bdat"  # reading a BDAT chunk's octets
    TLS_WAIT = "tls-wait"  # 220 sent to STARTTLS, handshake not confirmed yet
    CLOSED = "closed"


class _Sasl(enum.Enum):
    PLAIN = "plain"
    LOGIN_USER = "login-user"
    LOGIN_PASSWORD = "login-password"


class ServerConnection:
    """One SMTP session, server side. See the module docstring for the loop."""

    def __init__(
        self,
        *,
        hostname: str,
        max_message_size: int,
        max_recipients: int,
        starttls: bool,
        tls_active: bool = False,
        auth_mechanisms: Sequence[str] = SUPPORTED_MECHANISMS,
        auth_requires_tls: bool = True,
        max_errors: int = 20,
    ) -> None:
        mechanisms = tuple(m.upper() for m in auth_mechanisms)
        unknown = set(mechanisms) - set(SUPPORTED_MECHANISMS)
        if unknown:
            raise ValueError(f"unsupported SASL mechanisms: {sorted(unknown)}")
        self._hostname = hostname
        self._max_size = max_message_size
        self._max_rcpt = max_recipients
        self._starttls = starttls
        self._tls = tls_active
        self._mechanisms = mechanisms
        self._auth_requires_tls = auth_requires_tls
        self._max_errors = max_errors

        self._buf = b""
        self._pos = 0
        self._eof = False
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._phase = _Phase.BANNER
        self._discard_reply = _TOO_LONG
        self._pending: Event | None = None
        self._rejecting = False  # 554 banner: only QUIT is served (RFC 5321 §3.1)
        self._errors = 0
        self._pending_plaintext = b""

        self._helo: str | None = None
        self._esmtp = False
        self._user: str | None = None
        self._sasl = _Sasl.PLAIN
        self._sasl_user = ""

        # Transaction state.
        self._mail = False
        self._utf8 = False
        self._rcpts = 0
        self._in_data = False
        self._reader: DataReader | None = None
        self._bdat_open = False
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_chunk = 0
        self._bdat_size = 0
        self._bdat_too_big = False
        self._bdat_error: Reply | None = None
        self._bdat_check = LineEndingChecker()

        self._handlers: dict[type[Any], Callable[[Any], None]] = {
            Ehlo: self._on_ehlo,
            Helo: self._on_helo,
            Mail: self._on_mail,
            Rcpt: self._on_rcpt,
            Data: self._on_data,
            Bdat: self._on_bdat,
            Rset: self._on_rset,
            Noop: lambda cmd: self._queue(_OK),
            Quit: self._on_quit,
            Vrfy: lambda cmd: self._queue(_VRFY),
            Help: lambda cmd: self._queue(_HELP),
            StartTls: self._on_starttls,
            Auth: self._on_auth,
        }

    # ----------------------------------------------------------------- state
    @property
    def helo_name(self) -> str | None:
        return self._helo

    @property
    def esmtp(self) -> bool:
        return self._esmtp

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def authenticated_user(self) -> str | None:
        return self._user

    @property
    def in_data(self) -> bool:
        """Between 354 (or the first BDAT chunk) and the end of the message."""
        return self._in_data

    @property
    def in_transaction(self) -> bool:
        """MAIL was accepted and the transaction has not ended yet."""
        return self._mail

    @property
    def closed(self) -> bool:
        return self._phase is _Phase.CLOSED

    @property
    def pending_plaintext(self) -> bytes:
        """Plaintext discarded after 220 to STARTTLS (first 4 KiB), for the log."""
        return self._pending_plaintext

    @property
    def awaiting_tls(self) -> bool:
        """220 was sent to STARTTLS: do the handshake, then call tls_established()."""
        return self._phase is _Phase.TLS_WAIT

    @property
    def pending_decision(self) -> Event | None:
        """The decision event still waiting for ``send_reply``, if any."""
        return self._pending

    # ------------------------------------------------------------ public API
    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means EOF."""
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
            return
        if type(data) is not bytes:
            data = bytes(data)
        if self._phase is _Phase.TLS_WAIT:
            self._keep_plaintext(data)
        elif self._phase is _Phase.CLOSED:
            return
        elif self._pos >= len(self._buf):
            self._buf, self._pos = data, 0
        else:
            self._buf, self._pos = self._buf[self._pos :] + data, 0

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send_reply(self, reply: Reply) -> None:
        """The banner first, then exactly one reply per decision event."""
        if self._phase is _Phase.BANNER:
            self._queue(reply)
            self._phase = _Phase.COMMAND
            if reply.code == 554:
                self._rejecting = True
            elif not reply.is_positive:
                self._close()
            return
        pending = self._pending
        if pending is None:
            raise LocalProtocolError("send_reply() without a pending decision")
        self._pending = None
        self._queue(reply)
        ok = 200 <= reply.code < 300
        if isinstance(pending, MailFrom):
            if ok:
                self._mail = True
                self._utf8 = pending.params.smtputf8
        elif isinstance(pending, RcptTo):
            if ok:
                self._rcpts += 1
        elif isinstance(pending, EndOfMessage):
            self._reset_transaction(announce=True)
        elif isinstance(pending, StartTlsRequest):
            if reply.code == 220:
                # RFC 3207 §4: nothing sent before the handshake may be acted on.
                self._keep_plaintext(self._buf[self._pos :])
                self._buf, self._pos = b"", 0
                self._phase = _Phase.TLS_WAIT
        elif isinstance(pending, AuthAttempt) and reply.code == 235:
            self._user = pending.username
        if reply.code == 421:
            self._close()

    def tls_established(self) -> None:
        """The STARTTLS handshake succeeded: back to the greeting state, EHLO required."""
        if self._phase is not _Phase.TLS_WAIT:
            raise LocalProtocolError("tls_established() without an accepted STARTTLS")
        self._tls = True
        # RFC 3207 §4.2: forget everything learnt from the client before TLS.
        self._helo = None
        self._esmtp = False
        self._user = None
        self._reset_transaction(announce=False)
        self._phase = _Phase.COMMAND

    def close(self, reply: Reply | None = None) -> None:
        """Give up on the session (timeout, policy): queue ``reply`` (e.g. 421) and stop.

        Drops any pending decision; ``next_event`` returns ConnectionClosed from now on.
        """
        self._pending = None
        self._events.clear()
        if reply is not None and self._phase is not _Phase.CLOSED:
            self._queue(reply)
        self._close()

    def next_event(self) -> Event | NeedData:
        if self._events:
            return self._events.popleft()
        if self._pending is not None:
            raise LocalProtocolError(f"send_reply() for {self._pending!r} first")
        if self._phase is _Phase.BANNER:
            raise LocalProtocolError("send the banner with send_reply() first")
        while not self._events:
            if self._phase is _Phase.CLOSED:
                return ConnectionClosed()
            if not self._step():
                if self._eof:
                    self._close()
                    return ConnectionClosed()
                return NEED_DATA
        return self._events.popleft()

    # ------------------------------------------------------------- internals
    def _queue(self, reply: Reply) -> None:
        self._out.append(_wire(reply))

    def _error(self, reply: Reply) -> None:
        """A protocol error by the client: answer, and give up after max_errors."""
        self._queue(reply)
        self._errors += 1
        if self._errors >= self._max_errors:
            self._queue(_TOO_MANY_ERRORS)
            self._close()
            self._events.append(ConnectionClosed())

    def _close(self) -> None:
        self._phase = _Phase.CLOSED
        self._buf, self._pos = b"", 0

    def _keep_plaintext(self, data: bytes) -> None:
        room = MAX_PENDING_PLAINTEXT - len(self._pending_plaintext)
        if room > 0:
            self._pending_plaintext += data[:room]

    def _decide(self, event: Event) -> None:
        self._pending = event
        self._events.append(event)

    def _reset_transaction(self, *, announce: bool) -> None:
        if announce:
            self._events.append(TransactionReset())
        self._mail = False
        self._utf8 = False
        self._rcpts = 0
        self._in_data = False
        self._reader = None
        self._bdat_open = False
        self._bdat_size = 0

    def _step(self) -> bool:
        """Process some input; False when nothing can be done without more bytes."""
        phase = self._phase
        if phase is _Phase.COMMAND or phase is _Phase.SASL:
            return self._step_line(MAX_MAIL_LINE if phase is _Phase.COMMAND else MAX_SASL_LINE + 2)
        if phase is _Phase.DATA:
            return self._step_data()
        if phase is _Phase.BDAT:
            return self._step_bdat()
        if phase is _Phase.DISCARD:
            return self._step_discard()
        return False  # TLS_WAIT: paused until tls_established()

    def _step_line(self, limit: int) -> bool:
        buf, pos = self._buf, self._pos
        end = buf.find(b"\n", pos)
        if end < 0:
            if len(buf) - pos > limit:
                # Resync at the next LF without buffering the rest of the line.
                sasl = self._phase is _Phase.SASL
                self._discard_reply = _SASL_TOO_LONG if sasl else _TOO_LONG
                self._phase = _Phase.DISCARD
                self._buf, self._pos = b"", 0
                return True
            return False
        self._pos = end + 1
        # The line is everything up to its first LF, and the rules apply in a
        # fixed order to the whole of it: length, then line ending, then content.
        # A line over the limit is refused as too long whatever it holds, which
        # is all that can be known of it while it is still arriving (above), so
        # no split of the input changes the reply (fuzz/fuzz_data.py).
        size = end + 1 - pos
        if size > MAX_LINE and self._phase is _Phase.COMMAND:
            limit = max_line_length(buf[pos : pos + 5])
        if size > limit:
            if self._phase is _Phase.SASL:
                self._phase = _Phase.COMMAND
                self._error(_SASL_TOO_LONG)
            else:
                self._error(_TOO_LONG)
            return True
        if end == pos or buf[end - 1] != 13 or buf.find(b"\r", pos, end - 1) >= 0:
            # RFC 5321 §2.3.8: lines end in CRLF only; a bare LF or CR is refused.
            if self._phase is _Phase.SASL:
                self._phase = _Phase.COMMAND
            self._error(_BARE_LINE_END)
            return True
        line = buf[pos : end - 1]
        if self._phase is _Phase.SASL:
            self._on_sasl_line(line)
        else:
            self._on_command_line(line)
        return True

    def _step_discard(self) -> bool:
        end = self._buf.find(b"\n", self._pos)
        if end < 0:
            self._buf, self._pos = b"", 0
            return False
        self._pos = end + 1
        self._phase = _Phase.COMMAND
        self._error(self._discard_reply)
        return True

    def _on_command_line(self, line: bytes) -> None:
        try:
            cmd: Command = parse_command(line, smtputf8_ok=self._utf8)
        except CommandError as exc:
            self._error(exc.reply)
            return
        if self._rejecting and not isinstance(cmd, Quit):
            self._error(_NO_SERVICE)
            return
        self._handlers[type(cmd)](cmd)

    # --------------------------------------------------------------- commands
    def _on_ehlo(self, cmd: Ehlo) -> None:
        lines = [self._hostname, "PIPELINING", f"SIZE {self._max_size}", "8BITMIME",
                 "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING"]
        if self._starttls and not self._tls:
            lines.append("STARTTLS")
        if self._mechanisms and (self._tls or not self._auth_requires_tls):
            lines.append("AUTH " + " ".join(self._mechanisms))
        self._hello(cmd.domain, True, Reply(250, None, tuple(lines)))

    def _on_helo(self, cmd: Helo) -> None:
        self._hello(cmd.domain, False, Reply(250, None, self._hostname))

    def _hello(self, name: str, esmtp: bool, reply: Reply) -> None:
        # RFC 5321 §4.1.4: a later EHLO/HELO resets the state like RSET.
        self._reset_transaction(announce=self._mail)
        self._helo = name
        self._esmtp = esmtp
        self._queue(reply)
        self._events.append(Hello(esmtp, name))

    def _on_mail(self, cmd: Mail) -> None:
        if self._helo is None:
            self._error(_NEED_HELO)
        elif self._mail:
            self._error(_NESTED_MAIL)
        elif not self._esmtp and cmd.params != MailParams():
            self._error(_NO_PARAMS)  # RFC 5321 §4.1.1.11: parameters need EHLO
        elif cmd.params.body == "BINARYMIME":
            self._error(_NO_BINARYMIME)  # RFC 3030 §3: not offered
        elif cmd.params.size is not None and cmd.params.size > self._max_size:
            self._queue(_TOO_BIG)  # RFC 1870 §6.1
        else:
            self._decide(MailFrom(cmd.path, cmd.params))

    def _on_rcpt(self, cmd: Rcpt) -> None:
        if not self._mail:
            self._error(_NEED_MAIL)
        elif self._bdat_open:
            self._error(_BDAT_OPEN)
        elif self._rcpts >= self._max_rcpt:
            self._queue(_TOO_MANY_RCPT)  # RFC 5321 §4.5.3.1.10
        else:
            self._decide(RcptTo(cmd.path, cmd.params))

    def _on_data(self, cmd: Data) -> None:
        if not self._mail:
            self._error(_NEED_MAIL)
        elif self._bdat_open:
            self._error(_BDAT_OPEN)  # RFC 3030 §2: no DATA inside a BDAT transaction
        elif not self._rcpts:
            self._queue(_NO_RCPT)  # RFC 2920 §3.1
        else:
            self._queue(_START_DATA)
            self._reader = DataReader(self._max_size)
            self._in_data = True
            self._phase = _Phase.DATA
            self._events.append(DataStarted())

    def _on_bdat(self, cmd: Bdat) -> None:
        # RFC 3030 §2: the chunk follows the command at once, so even a refused
        # BDAT has its octets read and thrown away before the reply.
        self._bdat_error = None
        if not self._mail:
            self._bdat_error = _NEED_MAIL
        elif not self._rcpts:
            self._bdat_error = _NO_RCPT
        elif not self._bdat_open:
            self._bdat_open = True
            self._in_data = True
            self._bdat_size = 0
            self._bdat_too_big = False
            self._bdat_check = LineEndingChecker()
            self._events.append(DataStarted())
        self._bdat_remaining = self._bdat_chunk = cmd.size
        self._bdat_last = cmd.last
        self._phase = _Phase.BDAT
        if not cmd.size:
            self._bdat_chunk_done()

    def _on_rset(self, cmd: Rset) -> None:
        self._reset_transaction(announce=True)
        self._queue(_OK)

    def _on_quit(self, cmd: Quit) -> None:
        self._queue(_BYE)
        self._close()
        self._events.append(cmd)

    def _on_starttls(self, cmd: StartTls) -> None:
        if self._tls:
            self._error(_TLS_ACTIVE)
        elif not self._starttls:
            self._error(_NO_TLS)
        elif self._mail:
            self._error(_IN_TRANSACTION)
        else:
            self._decide(StartTlsRequest())

    # ------------------------------------------------------------ DATA, BDAT
    def _step_data(self) -> bool:
        reader = self._reader
        assert reader is not None
        if self._pos >= len(self._buf):
            return False
        chunk = self._buf[self._pos :] if self._pos else self._buf
        self._buf, self._pos = b"", 0
        body, rest = reader.feed(chunk)
        if body:
            self._events.append(BodyChunk(body))
        if rest is not None:
            self._buf = rest
            self._phase = _Phase.COMMAND
            if reader.bad_line_ending:
                self._refuse_message(_BARE_IN_DATA)
            elif reader.too_big:
                self._refuse_message(_TOO_BIG)
            else:
                self._in_data = False
                self._decide(EndOfMessage(reader.size))
        return True

    def _step_bdat(self) -> bool:
        available = len(self._buf) - self._pos
        if not available:
            return False
        take = min(available, self._bdat_remaining)
        if self._pos == 0 and take == len(self._buf):
            chunk = self._buf
        else:
            chunk = self._buf[self._pos : self._pos + take]
        self._pos += take
        self._bdat_remaining -= take
        if self._bdat_error is None:
            self._bdat_check.feed(chunk)
            self._bdat_size += take
            if self._bdat_size > self._max_size:
                self._bdat_too_big = True
            if not self._bdat_too_big:
                self._events.append(BodyChunk(chunk))
        if not self._bdat_remaining:
            self._bdat_chunk_done()
        return True

    def _bdat_chunk_done(self) -> None:
        self._phase = _Phase.COMMAND
        error = self._bdat_error
        if error is not None:
            self._bdat_error = None
            if error is _NO_RCPT:
                self._queue(error)
            else:
                self._error(error)
            return
        if not self._bdat_last:
            self._queue(Reply(250, "2.0.0", f"{self._bdat_chunk} octets received"))
            return
        check = self._bdat_check
        check.finish()
        if check.bad:
            # We do not offer BINARYMIME: stored mail must be clean CRLF text.
            self._refuse_message(_BARE_IN_DATA)
        elif self._bdat_too_big:
            self._refuse_message(_TOO_BIG)
        else:
            if not check.ends_with_crlf:
                self._events.append(BodyChunk(b"\r\n"))
                self._bdat_size += 2
            self._in_data = False
            self._bdat_open = False
            self._decide(EndOfMessage(self._bdat_size))

    def _refuse_message(self, reply: Reply) -> None:
        self._queue(reply)
        self._events.append(MessageRefused(reply))
        self._reset_transaction(announce=True)

    # ------------------------------------------------------------------ AUTH
    def _on_auth(self, cmd: Auth) -> None:
        if not self._mechanisms:
            self._error(_NO_AUTH)
        elif not self._esmtp:
            self._error(_NEED_EHLO)  # RFC 4954 §4: AUTH is an EHLO extension
        elif self._user is not None:
            self._error(_AUTHENTICATED)  # RFC 4954 §4: one successful AUTH per session
        elif self._mail:
            self._error(_IN_TRANSACTION)  # RFC 4954 §4: not during a transaction
        elif self._auth_requires_tls and not self._tls:
            self._queue(_AUTH_NEEDS_TLS)  # RFC 4954 §6
        elif cmd.mechanism not in self._mechanisms:
            self._error(_UNKNOWN_MECH)
        elif cmd.mechanism == "PLAIN":
            if cmd.initial_response is None:
                self._sasl_wait(_Sasl.PLAIN, _SASL_EMPTY)
            else:
                self._sasl_input(_Sasl.PLAIN, cmd.initial_response.encode())
        elif cmd.initial_response is None:
            self._sasl_wait(_Sasl.LOGIN_USER, _SASL_USERNAME)
        else:
            self._sasl_input(_Sasl.LOGIN_USER, cmd.initial_response.encode())

    def _sasl_wait(self, step: _Sasl, challenge: Reply) -> None:
        self._sasl = step
        self._phase = _Phase.SASL
        self._queue(challenge)

    def _on_sasl_line(self, line: bytes) -> None:
        self._phase = _Phase.COMMAND
        if line == b"*":
            self._queue(_AUTH_CANCELLED)  # RFC 4954 §4
        else:
            self._sasl_input(self._sasl, line)

    def _sasl_input(self, step: _Sasl, response: bytes) -> None:
        """One base64 client response ("=" is empty in an initial response, RFC 4954 §4)."""
        try:
            raw = b"" if response == b"=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            self._error(_BAD_BASE64)
            return
        if step is _Sasl.PLAIN:
            # RFC 4616 §2: [authzid] NUL authcid NUL passwd
            parts = raw.split(b"\0")
            texts = _utf8_all(parts) if len(parts) == 3 else None
            if texts is None:
                self._error(_BAD_SASL)
            else:
                self._decide(AuthAttempt("PLAIN", texts[0], texts[1], texts[2]))
            return
        text = _utf8_all([raw])
        if text is None:
            self._error(_BAD_SASL)
        elif step is _Sasl.LOGIN_USER:
            self._sasl_user = text[0]
            self._sasl_wait(_Sasl.LOGIN_PASSWORD, _SASL_PASSWORD)
        else:
            self._decide(AuthAttempt("LOGIN", "", self._sasl_user, text[0]))


def _utf8_all(parts: list[bytes]) -> list[str] | None:
    try:
        return [part.decode("utf-8") for part in parts]
    except UnicodeDecodeError:
        return None
