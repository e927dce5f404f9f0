"""The SMTP client on trio: the sans-IO ``ClientConnection`` driven over real sockets.

:class:`SMTPClient` is one connection: TCP connect, greeting, EHLO, STARTTLS
by policy, optional AUTH, then any number of transactions. What it sends as
mail data always comes out of the machine's ``dot_stuff`` (strict CRLF,
dot-stuffed, CRLF.CRLF only at the end), so whatever bytes a client gave us,
trio_mta can never be the sending half of an SMTP-smuggling chain.
The one-call API for applications, :func:`trio_mta.client.send.send_message`,
is built on it.

TLS modes (``tls=``):

- ``none``: plain text, STARTTLS never tried.
- ``opportunistic``: STARTTLS whenever offered, certificate not checked
  (RFC 7435: encryption without authentication beats cleartext). A failed
  handshake leaves the stream unusable, so the client reconnects to the same
  address and carries on in plain text.
- ``required``: never plain text; STARTTLS missing, refused or failing is an
  :class:`SMTPTLSError` (a temporary failure of this host).
- ``verify``: like ``required``, and the certificate must chain to a trusted
  CA and match ``server_hostname`` (the MX host name).
- ``implicit``: TLS from the first byte (RFC 8314 §3.3, port 465).

``tls_check`` is the hook outbound TLS policies (DANE, MTA-STS testing) use:
called with the certificate chain the server sent (DER, leaf first) right
after the handshake, before anything else is said inside TLS; a returned
reason fails the session with :class:`SMTPTLSError` (4.7.5).

:meth:`SMTPClient.connect_lmtp` opens an LMTP session (RFC 2033) instead, over
TCP or a Unix socket, for local delivery into a mail store such as Dovecot.

Timeouts follow RFC 5321 §4.5.3.2 (see :class:`Timeouts`); each one bounds
the wait for the replies to one burst of commands, so a server trickling a
byte at a time cannot hold a connection forever.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, get_args

import trio

from trio_mta import log
from trio_mta.smtp.client import (
    AuthResult,
    ClientConnection,
    ClientEvent,
    CommandResult,
    DsnRequest,
    Greeting,
    HelloResult,
    StartTlsResult,
    TransactionResult,
)
from trio_mta.smtp.errors import LocalProtocolError, SMTPProtocolError
from trio_mta.smtp.events import NEED_DATA
from trio_mta.smtp.replies import Reply
from trio_mta.socket_stream import DirectSocketStream, connect_ip, is_ip_literal
from trio_mta.tls import client_context, describe

if TYPE_CHECKING:
    from trio_mta.client.send import SendResult

__all__ = [
    "SMTPAuthError",
    "SMTPClient",
    "SMTPClientError",
    "SMTPConnectError",
    "SMTPDisconnected",
    "SMTPResponseError",
    "SMTPSendError",
    "SMTPTLSError",
    "SMTPTimeout",
    "TLSCheck",
    "TLSMode",
    "Timeouts",
    "TransactionResult",
]

TLSMode = Literal["none", "opportunistic", "required", "verify", "implicit"]
# A chain (DER, leaf first) in, None (accept) or the reason to refuse out.
TLSCheck = Callable[[tuple[bytes, ...]], str | None]
_TLS_MODES: Final = frozenset(get_args(TLSMode))

_RECEIVE_SIZE: Final = 65536
_BLOCK_SIZE: Final = 65536  # one "data block" of RFC 5321 §4.5.3.2.5
_QUIT_TIMEOUT: Final = 5.0  # a courtesy QUIT never waits the full command timeout

E = TypeVar("E")


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 §4.5.3.2 client timeouts in seconds; tests shrink them.

    ``command`` covers EHLO, STARTTLS and its handshake, AUTH, MAIL, RCPT (all
    5 minutes in the RFC), RSET and QUIT; with PIPELINING it bounds the wait
    for the whole MAIL/RCPT/DATA burst.
    """

    connect: float = 30.0
    greeting: float = 300.0  # §4.5.3.2.1
    command: float = 300.0  # §4.5.3.2.2, §4.5.3.2.3
    data_init: float = 120.0  # §4.5.3.2.4
    data_block: float = 180.0  # §4.5.3.2.5: each send of a block of the message
    data_end: float = 600.0  # §4.5.3.2.6: the reply to the final dot

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"timeout {name} must be positive, not {value!r}")


# --- errors -----------------------------------------------------------------------


class SMTPClientError(Exception):
    """Base of every client failure.

    ``reply`` is the server's reply when one caused the error; ``status`` is
    an RFC 3463 code describing it (the reply's own code when it had one), so
    the queue can record a status even for a refused connection.
    """

    default_status = "4.4.0"  # X.4.0: other network or routing status

    def __init__(
        self,
        message: str,
        *,
        reply: Reply | None = None,
        status: str | None = None,
        stage: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reply = reply
        self.stage = stage  # the step the reply answered: "greeting", "EHLO", "AUTH PLAIN" ...
        if status is None and reply is not None:
            status = reply.status or f"{reply.code // 100}.0.0"
        self.status = status or self.default_status


class SMTPConnectError(SMTPClientError):
    """The TCP connection could not be made."""

    default_status = "4.4.1"  # X.4.1: no answer from host


class SMTPTimeout(SMTPClientError):
    """A connect, reply or send exceeded its :class:`Timeouts` value."""

    default_status = "4.4.2"  # X.4.2: bad connection


class SMTPDisconnected(SMTPClientError):
    """The connection broke, or the server's replies stopped making sense."""

    default_status = "4.4.2"


class SMTPTLSError(SMTPClientError):
    """TLS was needed and could not be had (not offered, refused, handshake failed)."""

    default_status = "4.7.5"  # X.7.5: cryptographic failure


class SMTPResponseError(SMTPClientError):
    """The server refused a session step (``stage``: greeting, EHLO, STARTTLS ...)."""

    reply: Reply
    stage: str

    def __init__(self, stage: str, reply: Reply) -> None:
        super().__init__(f"{stage} refused: {reply}", reply=reply, stage=stage)


class SMTPAuthError(SMTPClientError):
    """AUTH impossible (no usable mechanism) or refused (``reply`` set)."""

    default_status = "4.7.0"


class SMTPSendError(SMTPClientError):
    """:func:`send_message`: no recipient got the message; ``result`` says why."""

    def __init__(self, message: str, result: SendResult) -> None:
        refusals = [r for r in result.recipients.values() if not r.is_success]
        super().__init__(message, reply=refusals[0] if refusals else result.reply)
        self.result = result


# --- one connection ---------------------------------------------------------------


class SMTPClient:
    """One SMTP connection; build it with :meth:`connect`, end it with :meth:`quit`.

    One step at a time: a second task using the same client at once gets
    ``trio.BusyResourceError``. After any error the client is not
    :attr:`usable` and should be closed.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: ClientConnection,
        *,
        host: str,
        address: str,
        port: int,
        timeouts: Timeouts,
        plain_auth_ok: bool,
    ) -> None:
        self._stream = stream
        self._conn = conn
        self._timeouts = timeouts
        self._plain_auth_ok = plain_auth_ok
        self._busy = False
        self._broken = False
        self._closed = False
        self.host = host
        self.address = address
        self.port = port
        self.tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" once encrypted
        self.peer_chain: tuple[bytes, ...] = ()  # the server's certificates, DER, leaf first
        self.tls_check: TLSCheck | None = None
        self.tls_fallback = False  # opportunistic TLS failed; this is the plain retry

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int = 25,
        *,
        helo_name: str,
        tls: TLSMode = "opportunistic",
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeouts: Timeouts | None = None,
        tls_check: TLSCheck | None = None,
    ) -> SMTPClient:
        """Connect to ``host`` (name or IP), read the greeting, EHLO, apply ``tls``.

        ``server_hostname`` is the name TLS sends (SNI) and, with a verifying
        context, checks the certificate against: the MX host name when
        ``host`` is its address. Without ``ssl_context``, ``opportunistic`` and
        ``required`` encrypt unverified; ``verify`` and ``implicit`` verify
        against the system trust store.
        """
        if tls not in _TLS_MODES:
            raise ValueError(f"unknown TLS mode {tls!r}")
        timeouts = timeouts or Timeouts()
        context = ssl_context
        if context is None and tls != "none":
            context = client_context("verify" if tls == "implicit" else tls, ca_file=None)
        name = _unbracket(server_hostname or host)

        async def session(implicit: ssl.SSLContext | None) -> SMTPClient:
            return await cls._session(
                host,
                port,
                helo_name=helo_name,
                tls_name=name,
                timeouts=timeouts,
                implicit=implicit,
                plain_auth_ok=tls == "none",
                tls_check=tls_check,
            )

        client = await session(context if tls == "implicit" else None)
        if tls in ("opportunistic", "required", "verify") and context is not None:
            try:
                encrypted = await client._starttls(context, name, required=tls != "opportunistic")
            except BaseException:
                await client.aclose()
                raise
            if not encrypted:
                # The failed handshake consumed the stream; RFC 7435 prefers a
                # cleartext session over none, so start again without STARTTLS.
                await client.aclose()
                client = await session(None)
                client.tls_fallback = True
        return client

    @classmethod
    async def connect_lmtp(
        cls, target: str, *, helo_name: str, timeouts: Timeouts | None = None
    ) -> SMTPClient:
        """Connect to an LMTP server, read the greeting and say LHLO.

        ``target`` is ``host:port`` or ``unix:/path``. No TLS: LMTP is for the
        local mail store, on loopback or a socket only this host can reach.
        """
        timeouts = timeouts or Timeouts()
        stream: trio.abc.Stream
        if target.startswith("unix:"):
            path = target[len("unix:") :]
            stream = await _open_unix(path, timeouts.connect)
            host, address, port = "localhost", path, 0
        else:
            host, _, port_text = target.rpartition(":")
            port = int(port_text)
            stream, address = await _open_tcp(host, port, timeouts.connect)
        client = cls(
            stream,
            ClientConnection(helo_name=helo_name, lmtp=True),
            host=_unbracket(host),
            address=address,
            port=port,
            timeouts=timeouts,
            plain_auth_ok=False,
        )
        try:
            await client._hello()
        except BaseException:
            await client.aclose()
            raise
        return client

    @classmethod
    async def _session(
        cls,
        host: str,
        port: int,
        *,
        helo_name: str,
        tls_name: str,
        timeouts: Timeouts,
        implicit: ssl.SSLContext | None,
        plain_auth_ok: bool,
        tls_check: TLSCheck | None = None,
    ) -> SMTPClient:
        """TCP (and implicit TLS), greeting and EHLO; closed again on any failure."""
        stream, address = await _open_tcp(host, port, timeouts.connect)
        client = cls(
            stream,
            ClientConnection(helo_name=helo_name),
            host=tls_name,
            address=address,
            port=port,
            timeouts=timeouts,
            plain_auth_ok=plain_auth_ok,
        )
        client.tls_check = tls_check
        try:
            if implicit is not None:
                await client._handshake(implicit, tls_name, required=True)
            await client._hello()
        except BaseException:
            await client.aclose()
            raise
        return client

    async def _hello(self) -> None:
        """Greeting, then EHLO (LHLO in LMTP); SMTPResponseError when either is refused."""
        greeting = await self._exchange(Greeting, "greeting", self._timeouts.greeting)
        if not greeting.reply.is_success:
            # RFC 5321 §3.1: after a 554 greeting the client should QUIT; 421 closes.
            if greeting.reply.code != 421:
                await self.quit()
            raise SMTPResponseError("greeting", greeting.reply)
        self._conn.ehlo()
        self._check_hello(await self._exchange(HelloResult, "EHLO", self._timeouts.command))

    # --- state ------------------------------------------------------------------

    @property
    def peer(self) -> str:
        """``mx1.example.org[192.0.2.1]``, the form Postfix logs."""
        return f"{self.host}[{self.address}]"

    @property
    def usable(self) -> bool:
        """False once closed, broken by an error, or told 421 by the server."""
        return not (self._closed or self._broken or self._conn.closed)

    @property
    def max_size(self) -> int | None:
        """The server's RFC 1870 SIZE limit, None when it states none."""
        return self._conn.max_size

    @property
    def dsn(self) -> bool:
        """The server advertised DSN: RFC 3461 parameters are passed on to it."""
        return self._conn.dsn

    @property
    def extensions(self) -> Mapping[str, str]:
        """EHLO keywords (upper case) and their parameters, as of the last EHLO."""
        return dict(self._conn.extensions)

    # --- steps --------------------------------------------------------------------

    async def login(self, username: str, password: str) -> Reply:
        """RFC 4954 AUTH: PLAIN when offered, else LOGIN.

        Credentials never travel in plain text unless the connection was made
        with ``tls="none"`` on purpose: a STARTTLS downgrade or an
        opportunistic fallback must not leak a password.
        """
        self._check_usable()
        if self.tls is None and not self._plain_auth_ok:
            raise SMTPTLSError("refusing to send credentials without TLS", status="4.7.10")
        offered = self._conn.auth_mechanisms
        mechanism = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
        if mechanism is None:
            shown = " ".join(sorted(offered)) or "none"
            raise SMTPAuthError(f"no usable AUTH mechanism (offered: {shown})", status="4.7.4")
        self._conn.authenticate(mechanism, username, password)
        result = await self._exchange(AuthResult, f"AUTH {mechanism}", self._timeouts.command)
        if result.reply.code != 235:
            raise SMTPAuthError(
                f"AUTH {mechanism} refused: {result.reply}",
                reply=result.reply,
                stage=f"AUTH {mechanism}",
            )
        return result.reply

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        smtputf8: bool | None = None,
        dsn: DsnRequest | None = None,
    ) -> TransactionResult:
        """One MAIL/RCPT/DATA transaction; ``result.outcomes[i]`` decides recipient i.

        ``sender`` "" is the null reverse-path. The machine refuses locally,
        without sending anything, a message over the server's SIZE (552 5.3.4,
        RFC 1870 §6) and non-ASCII addresses to a server without SMTPUTF8
        (553 5.6.7: RFC 6531 §3.2 forbids sending them, X.6.7 is its §3.5 code).
        Raises ``ValueError`` for an address that is not a valid path. ``dsn``
        goes out only if the server advertised DSN (see :attr:`dsn`).
        """
        self._check_usable()
        try:
            self._conn.send_mail(sender, recipients, data, smtputf8=smtputf8, dsn=dsn)
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from None
        return await self._exchange(
            TransactionResult, "MAIL/RCPT/DATA", self._timeouts.command, transaction=True
        )

    async def rset(self) -> Reply:
        """RSET (RFC 5321 §4.1.1.5); also proves an idle connection is still alive."""
        self._check_usable()
        self._conn.rset()
        return (await self._exchange(CommandResult, "RSET", self._timeouts.command)).reply

    async def noop(self) -> Reply:
        self._check_usable()
        self._conn.noop()
        return (await self._exchange(CommandResult, "NOOP", self._timeouts.command)).reply

    async def quit(self) -> None:
        """QUIT (RFC 5321 §4.1.1.10) if possible, then close. Never raises SMTP errors:
        whatever was sent before is already accepted or refused."""
        try:
            if self.usable:
                self._conn.quit()
                await self._exchange(
                    CommandResult, "QUIT", min(self._timeouts.command, _QUIT_TIMEOUT)
                )
        except SMTPClientError:
            pass
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the connection without QUIT."""
        if self._closed:
            return
        self._closed = True
        # trio's aclose always closes, even when its graceful part is cut short.
        with trio.move_on_after(1.0):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._stream.aclose()

    async def __aenter__(self) -> SMTPClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.quit()

    # --- internals ------------------------------------------------------------------

    def _check_usable(self) -> None:
        if not self.usable:
            raise SMTPDisconnected(f"connection to {self.peer} is no longer usable")

    def _check_hello(self, hello: HelloResult) -> None:
        if not hello.reply.is_success:
            raise SMTPResponseError("EHLO" if hello.esmtp else "EHLO/HELO", hello.reply)

    async def _starttls(self, context: ssl.SSLContext, name: str, *, required: bool) -> bool:
        """RFC 3207 STARTTLS. False: the handshake failed and the stream is unusable."""
        conn = self._conn
        if not conn.starttls:
            if required:
                # X.7.10: encryption needed (RFC 5248 registry).
                raise SMTPTLSError("STARTTLS not offered", status="4.7.10")
            return True
        conn.start_tls()
        answer = await self._exchange(StartTlsResult, "STARTTLS", self._timeouts.command)
        if answer.reply.code != 220:
            if required:
                raise SMTPTLSError(
                    f"STARTTLS refused: {answer.reply}", reply=answer.reply, stage="STARTTLS"
                )
            return True
        if not await self._handshake(context, name, required=required):
            return False
        conn.tls_established()
        if conn.discarded_plaintext:
            # Bytes sent after 220 but before the handshake: a STARTTLS injection
            # attempt (CVE-2011-0411 style); the machine dropped them unread.
            log.warning(
                "smtp_client.tls_injection", peer=self.peer, octets=len(conn.discarded_plaintext)
            )
        self._check_hello(await self._exchange(HelloResult, "EHLO", self._timeouts.command))
        return True

    async def _handshake(self, context: ssl.SSLContext, name: str, *, required: bool) -> bool:
        tls_stream = trio.SSLStream(self._stream, context, server_hostname=name or None)
        reason = ""
        try:
            with trio.fail_after(self._timeouts.command):
                await tls_stream.do_handshake()
        except trio.TooSlowError:
            reason = f"timed out after {self._timeouts.command:g}s"
        except trio.BrokenResourceError as exc:
            reason = _tls_reason(exc)
        except BaseException:
            self._broken = True
            raise
        if reason:
            self._broken = True
            if required:
                raise SMTPTLSError(f"TLS handshake failed: {reason}")
            log.event("smtp_client.tls_failed", peer=self.peer, error=reason)
            return False
        self._stream = tls_stream
        self.tls = describe(_TLSView(tls_stream))
        self.peer_chain = _peer_chain(tls_stream)
        if self.tls_check is not None:
            problem = self.tls_check(self.peer_chain)
            if problem is not None:
                self._broken = True
                raise SMTPTLSError(problem, status="4.7.5")
        return True

    async def _exchange(
        self, kind: type[E], what: str, timeout: float, *, transaction: bool = False
    ) -> E:
        """Run the machine's current step to its result, mapping failures to our errors."""
        if self._busy:
            raise trio.BusyResourceError("another task is using this SMTP connection")
        self._busy = True
        try:
            event = await self._drive(what, timeout, transaction)
        except SMTPProtocolError as exc:
            self._broken = True
            raise SMTPDisconnected(f"{exc} (during {what})") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._broken = True
            raise SMTPDisconnected(f"connection lost during {what}: {_why(exc)}") from None
        except BaseException:
            self._broken = True  # a timeout or cancellation leaves a step half done
            raise
        finally:
            self._busy = False
        if not isinstance(event, kind):
            self._broken = True
            raise SMTPDisconnected(f"unexpected {type(event).__name__} after {what}")
        return event

    async def _drive(self, what: str, timeout: float, transaction: bool) -> ClientEvent:
        """The machine's driving loop, with a deadline per burst of commands.

        In a transaction the phase is read off what the machine sends: a lone
        ``DATA`` (no PIPELINING) waits ``data_init``; the message itself ends
        in ".\\r\\n", which no MAIL/RCPT/DATA/RSET line does, and its reply
        waits ``data_end``.
        """
        conn = self._conn
        deadline = trio.current_time() + timeout
        while True:
            # next_event() first: feeding it a reply may queue the next command
            # (RCPT after MAIL without PIPELINING), which must go out before we
            # wait for more replies.
            event = conn.next_event()
            out = conn.data_to_send()
            if out:
                if transaction and out.endswith(b".\r\n"):
                    await self._send_message_data(out)
                    what, timeout = "end of data", self._timeouts.data_end
                else:
                    await self._send(out, timeout, what)
                    if transaction and out == b"DATA\r\n":
                        what, timeout = "DATA", self._timeouts.data_init
                deadline = trio.current_time() + timeout
            if event is not NEED_DATA:
                return event
            data: bytes | bytearray = b""
            with trio.move_on_at(deadline) as scope:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
            if scope.cancelled_caught:
                raise SMTPTimeout(f"no reply to {what} within {timeout:g}s")
            conn.receive_data(bytes(data))

    async def _send(self, data: bytes | memoryview, timeout: float, what: str) -> None:
        with trio.move_on_after(timeout) as scope:
            await self._stream.send_all(data)
        if scope.cancelled_caught:
            raise SMTPTimeout(f"sending {what} stalled for {timeout:g}s")

    async def _send_message_data(self, wire: bytes) -> None:
        view = memoryview(wire)
        for start in range(0, len(view), _BLOCK_SIZE):
            await self._send(
                view[start : start + _BLOCK_SIZE], self._timeouts.data_block, "message data"
            )


class _TLSView:
    """``version()``/``cipher()`` of a trio SSLStream, typed for :func:`describe`."""

    def __init__(self, stream: trio.SSLStream[trio.abc.Stream]) -> None:
        self._stream = stream

    def version(self) -> str | None:
        version: str | None = self._stream.version()
        return version

    def cipher(self) -> tuple[str, str, int] | None:
        cipher: tuple[str, str, int] | None = self._stream.cipher()
        return cipher


def _peer_chain(stream: trio.SSLStream[trio.abc.Stream]) -> tuple[bytes, ...]:
    """The certificates the server sent, DER, leaf first.

    Python 3.13 has ``SSLObject.get_unverified_chain()``; 3.10 to 3.12 have the
    same call on the private ``_sslobj``. Without either, only the leaf
    (``getpeercert(binary_form=True)``), which is all DANE-EE needs.
    """
    getpeercert = stream.getpeercert  # trio forwards it: a bound method of the SSLObject
    ssl_object: Any = getattr(getpeercert, "__self__", None)
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        return tuple(
            cert if isinstance(cert, bytes) else cert.public_bytes(_ENCODING_DER) for cert in chain
        )
    leaf = getpeercert(binary_form=True)
    return (leaf,) if leaf else ()


_ENCODING_DER: Final = 2  # _ssl.ENCODING_DER, what _ssl.Certificate.public_bytes takes


async def _open_tcp(
    host: str, port: int, timeout: float
) -> tuple[trio.SocketStream | DirectSocketStream, str]:
    """Connected to ``host``: an IP literal (what delivery resolved MX hosts to)
    directly, a name through trio's resolver and happy eyeballs."""
    target = _unbracket(host)
    stream: trio.SocketStream | DirectSocketStream
    try:
        with trio.fail_after(timeout):
            if is_ip_literal(target):
                stream = await connect_ip(target, port)
            else:
                stream = await trio.open_tcp_stream(target, port)
    except trio.TooSlowError:
        raise SMTPTimeout(f"connect to {target} port {port} timed out after {timeout:g}s") from None
    except OSError as exc:
        raise SMTPConnectError(f"connect to {target} port {port}: {_why(exc)}") from None
    try:
        address = str(stream.socket.getpeername()[0])
    except OSError:
        address = target
    return stream, address


async def _open_unix(path: str, timeout: float) -> trio.SocketStream:
    try:
        with trio.fail_after(timeout):
            return await trio.open_unix_socket(path)
    except trio.TooSlowError:
        raise SMTPTimeout(f"connect to {path} timed out after {timeout:g}s") from None
    except OSError as exc:
        raise SMTPConnectError(f"connect to {path}: {_why(exc)}") from None


def _unbracket(host: str) -> str:
    """``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` (address literals) to the bare address."""
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        return inner[5:] if inner[:5].lower() == "ipv6:" else inner
    return host


def _why(exc: BaseException) -> str:
    """A short reason: the OS error text, or the SSL/OS cause trio wrapped.

    ``trio.open_tcp_stream`` reports a failed connect as "all attempts to
    connect to ... failed", the real causes ("Connection refused") in the
    exception group it chains: those are what an operator needs.
    """
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    group = cause.__cause__ if cause is not None else None
    if isinstance(cause, OSError) and isinstance(group, BaseExceptionGroup):
        reasons = [
            os.strerror(leaf.errno) if isinstance(leaf, OSError) and leaf.errno else _why(leaf)
            for leaf in _leaves(group)
        ]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    return str(cause or exc) or type(cause or exc).__name__


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _tls_reason(exc: trio.BrokenResourceError) -> str:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return _why(exc)
