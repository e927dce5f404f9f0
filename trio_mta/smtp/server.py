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
§4, CVE-2011-0411).

Two pieces of state, as in h11's ``_state.py``:

- the *phase* says what the next input bytes are (a command line, a SASL
  response, DATA, a BDAT chunk, ...) and picks the reader;
- the *state* says where the conversation is (greeted? MAIL accepted? any
  recipient? a BDAT message open?). What a command does in a state is data:
  ``_TRANSITIONS[state][command type]`` is its handler or its fixed refusal,
  so sequence rules are written once (RFC 5321 §4.1.4, RFC 3030 §2) and
  handlers only check arguments. Refusals that depend on what the session
  offers (STARTTLS, AUTH) are folded into one precomputed table per offer,
  so they take precedence over sequence errors and cost nothing per command.

Input is kept as one ``bytes`` plus an offset: each line is found with one
``find`` from where the last one ended, and leftovers are only ever a partial
line, so there is neither rescanning nor quadratic concatenation. A line is
everything up to its first LF, judged as a whole in a fixed order: length
first (512 octets with CRLF, MAIL 1038, a SASL response 12290), then the line
ending (CRLF only, RFC 5321 §2.3.8), then its content. An over-long line is
refused as too long whatever else it holds, because that is all that can be
known of it while it is still arriving: no split of the input can change a
reply. DATA and BDAT are framed by :class:`DataReader` and
:class:`BdatReader` and streamed out as :class:`BodyChunk` events.

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
from collections.abc import Callable, Mapping, Sequence
from functools import cache, lru_cache
from typing import Any, TypeAlias

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
    RcptParams,
    Rset,
    StartTls,
    Vrfy,
    max_line_length,
    parse_command,
)
from trio_mta.smtp.data import BdatReader, DataReader
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
_NO_MAIL_PARAMS = MailParams()
_NO_RCPT_PARAMS = RcptParams()


@lru_cache(maxsize=512)
def _wire(reply: Reply) -> bytes:
    return reply.format()


class _Phase(enum.Enum):
    """What the next input bytes are."""

    BANNER = "banner"  # nothing parsed until the caller sent the greeting
    COMMAND = "command"
    DISCARD = "discard"  # dropping an over-long line up to its LF
    SASL = "sasl"  # reading an AUTH continuation line
    DATA = "data"  # after 354
    BDAT = "bdat"  # reading a BDAT chunk's octets
    SKIP = "skip"  # throwing away the octets of a refused BDAT chunk
    TLS_WAIT = "tls-wait"  # 220 sent to STARTTLS, handshake not confirmed yet
    CLOSED = "closed"

    # Members are singletons: hashing by identity keeps the per-line table
    # lookups in C (Enum.__hash__ is Python code).
    __hash__ = object.__hash__


class _State(enum.Enum):
    """Where the conversation is; the rows of ``_TRANSITIONS``."""

    GREETING = "greeting"  # no EHLO/HELO yet (again after STARTTLS)
    IDLE = "idle"  # greeted, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    BDAT = "bdat"  # a BDAT message is open (DATA and RCPT are refused)
    REJECTING = "rejecting"  # 554 banner: only QUIT is served (RFC 5321 §3.1)

    __hash__ = object.__hash__  # as _Phase


_IN_TRANSACTION_STATES = frozenset((_State.MAIL, _State.RCPT, _State.BDAT))


class _TlsOffer(enum.Enum):
    OFFERED = "offered"
    NOT_OFFERED = "not-offered"
    ACTIVE = "active"


class _AuthOffer(enum.Enum):
    OFFERED = "offered"  # the EHLO reply decides whether it is listed
    DISABLED = "disabled"  # no mechanisms configured
    DONE = "done"  # RFC 4954 §4: one successful AUTH per session


class _Sasl(enum.Enum):
    PLAIN = "plain"
    LOGIN_USER = "login-user"
    LOGIN_PASSWORD = "login-password"


# What a command does in a state: a function of the machine and the command.
_Action: TypeAlias = Callable[["ServerConnection", Any], None]
_Row: TypeAlias = Mapping[type[Any], _Action]


def _refuse(reply: Reply) -> _Action:
    """A client mistake: answer ``reply``; it counts toward max_errors."""
    return lambda conn, cmd: conn._error(reply)


def _answer(reply: Reply) -> _Action:
    """A fixed reply that is no mistake (NOOP, or a policy refusal)."""
    return lambda conn, cmd: conn._queue(reply)


def _skip_chunk(reply: Reply, *, mistake: bool) -> _Action:
    """RFC 3030 §2: a refused BDAT's octets follow at once; read them, then refuse."""
    return lambda conn, cmd: conn._skip_chunk(cmd.size, reply, mistake)


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
        self._errors = 0
        self._pending_plaintext = b""

        # Session: what the client said and what we offer.
        self._helo: str | None = None
        self._esmtp = False
        self._user: str | None = None
        self._sasl = _Sasl.PLAIN
        self._sasl_user = ""
        self._table: Mapping[_State, _Row] = {}
        self._ehlo_reply = _OK
        self._state = _State.GREETING
        self._row: _Row = {}
        self._offer_changed()

        # Transaction.
        self._utf8 = False
        self._rcpts = 0
        self._data: DataReader | None = None
        self._bdat: BdatReader | None = None
        self._skip_left = 0
        self._skip_reply = _NEED_MAIL
        self._skip_mistake = True

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
        return self._phase is _Phase.DATA or self._state is _State.BDAT

    @property
    def in_transaction(self) -> bool:
        """MAIL was accepted and the transaction has not ended yet."""
        return self._state in _IN_TRANSACTION_STATES

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
                self._enter(_State.REJECTING)
            elif not reply.is_positive:
                self._close()
            return
        pending = self._pending
        if pending is None:
            raise LocalProtocolError("send_reply() without a pending decision")
        self._pending = None
        self._queue(reply)
        _ANSWERED[type(pending)](self, pending, reply)
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
        self._offer_changed()
        self._enter(_State.GREETING)

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
            if not _STEPS[self._phase](self):
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

    def _enter(self, state: _State) -> None:
        self._state = state
        self._row = self._table[state]

    def _offer_changed(self) -> None:
        """TLS or AUTH changed what the session offers: pick the table and EHLO reply."""
        if self._tls:
            tls = _TlsOffer.ACTIVE
        else:
            tls = _TlsOffer.OFFERED if self._starttls else _TlsOffer.NOT_OFFERED
        if not self._mechanisms:
            auth = _AuthOffer.DISABLED
        else:
            auth = _AuthOffer.DONE if self._user is not None else _AuthOffer.OFFERED
        self._table = _table(tls, auth)
        self._row = self._table[self._state]
        lines = [
            self._hostname,
            "PIPELINING",
            f"SIZE {self._max_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "DSN",
        ]
        if tls is _TlsOffer.OFFERED:
            lines.append("STARTTLS")
        if self._mechanisms and (self._tls or not self._auth_requires_tls):
            lines.append("AUTH " + " ".join(self._mechanisms))
        self._ehlo_reply = Reply(250, None, tuple(lines))

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
        if self._state in _IN_TRANSACTION_STATES:
            self._state, self._row = _State.IDLE, self._table[_State.IDLE]
        self._utf8 = False
        self._rcpts = 0
        self._data = None
        self._bdat = None

    # ---------------------------------------------------------- command lines
    def _step_line(self) -> bool:
        """Read one command or SASL line; False when it has not fully arrived."""
        buf, pos = self._buf, self._pos
        sasl = self._phase is _Phase.SASL
        limit = MAX_SASL_LINE + 2 if sasl else MAX_MAIL_LINE
        end = buf.find(b"\n", pos)
        if end < 0:
            if len(buf) - pos > limit:
                # Too long whatever follows: resync at the next LF without
                # buffering the rest of the line.
                self._discard_reply = _SASL_TOO_LONG if sasl else _TOO_LONG
                self._phase = _Phase.DISCARD
                self._buf, self._pos = b"", 0
                return True
            return False
        self._pos = end + 1
        # The whole line, judged in a fixed order (module docstring).
        size = end + 1 - pos
        if size > MAX_LINE and not sasl:
            limit = max_line_length(buf[pos : pos + 5])
        if size > limit:
            self._phase = _Phase.COMMAND
            self._error(_SASL_TOO_LONG if sasl else _TOO_LONG)
        elif end == pos or buf[end - 1] != 13 or buf.find(b"\r", pos, end - 1) >= 0:
            # RFC 5321 §2.3.8: lines end in CRLF only; a bare LF or CR is refused.
            self._phase = _Phase.COMMAND
            self._error(_BARE_LINE_END)
        elif sasl:
            self._phase = _Phase.COMMAND
            self._on_sasl_line(buf[pos : end - 1])
        else:
            try:
                cmd: Command = parse_command(buf[pos : end - 1], smtputf8_ok=self._utf8)
            except CommandError as exc:
                self._error(exc.reply)
            else:
                self._row[type(cmd)](self, cmd)
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

    def _step_paused(self) -> bool:
        return False  # BANNER, TLS_WAIT (until tls_established()), CLOSED

    # --------------------------------------------------------------- commands
    def _on_ehlo(self, cmd: Ehlo) -> None:
        self._hello(cmd.domain, True, self._ehlo_reply)

    def _on_helo(self, cmd: Helo) -> None:
        self._hello(cmd.domain, False, Reply(250, None, self._hostname))

    def _hello(self, name: str, esmtp: bool, reply: Reply) -> None:
        # RFC 5321 §4.1.4: a later EHLO/HELO resets the state like RSET.
        self._reset_transaction(announce=self._state in _IN_TRANSACTION_STATES)
        self._helo = name
        self._esmtp = esmtp
        self._enter(_State.IDLE)
        self._queue(reply)
        self._events.append(Hello(esmtp, name))

    def _on_mail(self, cmd: Mail) -> None:
        params = cmd.params
        if not self._esmtp and params != _NO_MAIL_PARAMS:
            self._error(_NO_PARAMS)  # RFC 5321 §4.1.1.11: parameters need EHLO
        elif params.body == "BINARYMIME":
            self._error(_NO_BINARYMIME)  # RFC 3030 §3: not offered
        elif params.size is not None and params.size > self._max_size:
            self._queue(_TOO_BIG)  # RFC 1870 §6.1
        else:
            self._decide(MailFrom(cmd.path, params))

    def _on_rcpt(self, cmd: Rcpt) -> None:
        if not self._esmtp and cmd.params != _NO_RCPT_PARAMS:
            self._error(_NO_PARAMS)  # RFC 5321 §4.1.1.11: parameters need EHLO
        elif self._rcpts >= self._max_rcpt:
            self._queue(_TOO_MANY_RCPT)  # RFC 5321 §4.5.3.1.10
        else:
            self._decide(RcptTo(cmd.path, cmd.params))

    def _on_rset(self, cmd: Rset) -> None:
        self._reset_transaction(announce=True)
        self._queue(_OK)

    def _on_quit(self, cmd: Quit) -> None:
        self._queue(_BYE)
        self._close()
        self._events.append(cmd)

    def _on_starttls(self, cmd: StartTls) -> None:
        self._decide(StartTlsRequest())

    # ------------------------------------------------------------ DATA, BDAT
    def _on_data(self, cmd: Data) -> None:
        self._queue(_START_DATA)
        self._data = DataReader(self._max_size)
        self._phase = _Phase.DATA
        self._events.append(DataStarted())

    def _step_data(self) -> bool:
        reader = self._data
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
                self._decide(EndOfMessage(reader.size))
        return True

    def _on_bdat(self, cmd: Bdat) -> None:
        reader = self._bdat
        if reader is None or self._state is not _State.BDAT:  # the first chunk opens it
            reader = self._bdat = BdatReader(self._max_size)
            self._enter(_State.BDAT)
            self._events.append(DataStarted())
        reader.begin_chunk(cmd.size, cmd.last)
        self._phase = _Phase.BDAT
        if not cmd.size:
            self._bdat_chunk_done(reader)

    def _step_bdat(self) -> bool:
        reader = self._bdat
        assert reader is not None
        if self._pos >= len(self._buf):
            return False
        body, self._pos = reader.feed(self._buf, self._pos)
        if body:
            self._events.append(BodyChunk(body))
        if reader.chunk_done:
            self._bdat_chunk_done(reader)
        return True

    def _bdat_chunk_done(self, reader: BdatReader) -> None:
        self._phase = _Phase.COMMAND
        if not reader.last:
            self._queue(Reply(250, "2.0.0", f"{reader.chunk_size} octets received"))
            return
        tail = reader.finish()
        if reader.bad_line_ending:
            self._refuse_message(_BARE_IN_DATA)
        elif reader.too_big:
            self._refuse_message(_TOO_BIG)
        else:
            if tail:
                self._events.append(BodyChunk(tail))
            self._enter(_State.RCPT)  # the message is complete: no longer in data
            self._decide(EndOfMessage(reader.size))

    def _skip_chunk(self, size: int, reply: Reply, mistake: bool) -> None:
        self._skip_left, self._skip_reply, self._skip_mistake = size, reply, mistake
        self._phase = _Phase.SKIP
        if not size:
            self._skip_done()

    def _step_skip(self) -> bool:
        available = len(self._buf) - self._pos
        if not available:
            return False
        take = min(available, self._skip_left)
        self._pos += take
        self._skip_left -= take
        if not self._skip_left:
            self._skip_done()
        return True

    def _skip_done(self) -> None:
        self._phase = _Phase.COMMAND
        if self._skip_mistake:
            self._error(self._skip_reply)
        else:
            self._queue(self._skip_reply)

    def _refuse_message(self, reply: Reply) -> None:
        self._queue(reply)
        self._events.append(MessageRefused(reply))
        self._reset_transaction(announce=True)

    # ------------------------------------------------------------------ AUTH
    def _on_auth(self, cmd: Auth) -> None:
        if not self._esmtp:
            self._error(_NEED_EHLO)  # RFC 4954 §4: AUTH is an EHLO extension
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


# ------------------------------------------------------------------ the tables
_STEPS: dict[_Phase, Callable[[ServerConnection], bool]] = {
    _Phase.BANNER: ServerConnection._step_paused,
    _Phase.COMMAND: ServerConnection._step_line,
    _Phase.SASL: ServerConnection._step_line,
    _Phase.DISCARD: ServerConnection._step_discard,
    _Phase.DATA: ServerConnection._step_data,
    _Phase.BDAT: ServerConnection._step_bdat,
    _Phase.SKIP: ServerConnection._step_skip,
    _Phase.TLS_WAIT: ServerConnection._step_paused,
    _Phase.CLOSED: ServerConnection._step_paused,
}

# Commands that mean the same in every state but REJECTING.
_ANY_STATE: dict[type[Any], _Action] = {
    Ehlo: ServerConnection._on_ehlo,
    Helo: ServerConnection._on_helo,
    Rset: ServerConnection._on_rset,
    Noop: _answer(_OK),
    Quit: ServerConnection._on_quit,
    Vrfy: _answer(_VRFY),
    Help: _answer(_HELP),
    StartTls: ServerConnection._on_starttls,
    Auth: ServerConnection._on_auth,
}
# Outside a transaction, and inside one (RFC 5321 §4.1.4, RFC 3030 §2, RFC 4954 §4,
# RFC 3207 §4: neither STARTTLS nor AUTH in the middle of a transaction).
_NO_TRANSACTION: dict[type[Any], _Action] = {
    Rcpt: _refuse(_NEED_MAIL),
    Data: _refuse(_NEED_MAIL),
    Bdat: _skip_chunk(_NEED_MAIL, mistake=True),
}
_TRANSACTION: dict[type[Any], _Action] = {
    Mail: _refuse(_NESTED_MAIL),
    StartTls: _refuse(_IN_TRANSACTION),
    Auth: _refuse(_IN_TRANSACTION),
}
_TRANSITIONS: dict[_State, dict[type[Any], _Action]] = {
    _State.GREETING: {**_ANY_STATE, **_NO_TRANSACTION, Mail: _refuse(_NEED_HELO)},
    _State.IDLE: {**_ANY_STATE, **_NO_TRANSACTION, Mail: ServerConnection._on_mail},
    _State.MAIL: {
        **_ANY_STATE,
        **_TRANSACTION,
        Rcpt: ServerConnection._on_rcpt,
        Data: _answer(_NO_RCPT),  # RFC 2920 §3.1: a policy outcome, not a mistake
        Bdat: _skip_chunk(_NO_RCPT, mistake=False),
    },
    _State.RCPT: {
        **_ANY_STATE,
        **_TRANSACTION,
        Rcpt: ServerConnection._on_rcpt,
        Data: ServerConnection._on_data,
        Bdat: ServerConnection._on_bdat,
    },
    _State.BDAT: {
        **_ANY_STATE,
        **_TRANSACTION,
        Rcpt: _refuse(_BDAT_OPEN),
        Data: _refuse(_BDAT_OPEN),  # RFC 3030 §2: no DATA inside a BDAT transaction
        Bdat: ServerConnection._on_bdat,
    },
    _State.REJECTING: {
        **{cls: _refuse(_NO_SERVICE) for cls in (*_ANY_STATE, Mail, Rcpt, Data, Bdat)},
        Quit: ServerConnection._on_quit,
    },
}
# What the session does not offer is refused before any sequence rule applies.
_TLS_REFUSALS = {_TlsOffer.NOT_OFFERED: _NO_TLS, _TlsOffer.ACTIVE: _TLS_ACTIVE}
_AUTH_REFUSALS = {_AuthOffer.DISABLED: _NO_AUTH, _AuthOffer.DONE: _AUTHENTICATED}


@cache
def _table(tls: _TlsOffer, auth: _AuthOffer) -> Mapping[_State, _Row]:
    """``_TRANSITIONS`` for one offer (at most nine tables, built once each)."""
    overrides: dict[type[Any], _Action] = {}
    if tls in _TLS_REFUSALS:
        overrides[StartTls] = _refuse(_TLS_REFUSALS[tls])
    if auth in _AUTH_REFUSALS:
        overrides[Auth] = _refuse(_AUTH_REFUSALS[auth])
    return {
        state: row if state is _State.REJECTING else {**row, **overrides}
        for state, row in _TRANSITIONS.items()
    }


# ---------------------------------------------------- replies to decisions
# On the per-message path: _enter() is inlined.
def _mail_answered(conn: ServerConnection, event: MailFrom, reply: Reply) -> None:
    if reply.is_success:
        conn._utf8 = event.params.smtputf8
        conn._state, conn._row = _State.MAIL, conn._table[_State.MAIL]


def _rcpt_answered(conn: ServerConnection, event: RcptTo, reply: Reply) -> None:
    if reply.is_success:
        conn._rcpts += 1
        if conn._state is _State.MAIL:
            conn._state, conn._row = _State.RCPT, conn._table[_State.RCPT]


def _message_answered(conn: ServerConnection, event: EndOfMessage, reply: Reply) -> None:
    conn._reset_transaction(announce=True)  # whatever the reply


def _starttls_answered(conn: ServerConnection, event: StartTlsRequest, reply: Reply) -> None:
    if reply.code == 220:
        # RFC 3207 §4: nothing sent before the handshake may be acted on.
        conn._keep_plaintext(conn._buf[conn._pos :])
        conn._buf, conn._pos = b"", 0
        conn._phase = _Phase.TLS_WAIT


def _auth_answered(conn: ServerConnection, event: AuthAttempt, reply: Reply) -> None:
    if reply.code == 235:
        conn._user = event.username
        conn._offer_changed()


_ANSWERED: dict[type[Any], Callable[[ServerConnection, Any, Reply], None]] = {
    MailFrom: _mail_answered,
    RcptTo: _rcpt_answered,
    EndOfMessage: _message_answered,
    StartTlsRequest: _starttls_answered,
    AuthAttempt: _auth_answered,
}
