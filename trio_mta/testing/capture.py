"""Capture servers: a real trio_mta SMTP server that keeps every message for a test.

The server is the production one (``trio_mta.serve`` with a handler and
``queue=False``): the same parser, line-length and bare-LF rules, size limit,
PIPELINING, CHUNKING, SMTPUTF8 and STARTTLS. Only the policy differs: every
sender and recipient is accepted, nothing is queued or relayed, and the
message is kept in memory exactly as the client sent it.

Two flavours share everything but how they run:

- :class:`SMTPCapture` runs trio in a thread of its own, for plain synchronous
  code (``with SMTPCapture() as cap:``, or the ``smtp_capture`` fixture);
- :class:`TrioSMTPCapture` runs in the caller's nursery, for trio code
  (``await nursery.start(TrioSMTPCapture().serve)``, :func:`open_capture`, or
  the ``trio_mta_capture`` fixture).
"""

from __future__ import annotations

import email
import email.message
import email.policy
import functools
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

from trio_mta.server.handler import Handler
from trio_mta.smtp import Reply
from trio_mta.testing.certs import client_context, test_certificates

if TYPE_CHECKING:
    import ssl

    from trio_mta.config import Config
    from trio_mta.server.envelope import Envelope, SessionInfo

__all__ = [
    "CapturedMessage",
    "MessagesNotReceived",
    "SMTPCapture",
    "TrioSMTPCapture",
    "open_capture",
]

DEFAULT_HOSTNAME = "localhost"
# A test suite may open many connections at once from 127.0.0.1: the production
# per-IP limit (20) would refuse them with 421 and fail tests for the wrong reason.
_CONNECTIONS = 1000


@dataclass(frozen=True, eq=False)
class CapturedMessage:
    """One accepted message: the envelope, the bytes, and what the session said.

    ``data`` is exactly what the client sent (CRLF line ends, dot-stuffing
    undone, no ``Received:`` added); with BDAT the server adds a final CRLF
    when the last chunk lacks one, as RFC 3030 lets it.
    """

    sender: str  # "" for the null reverse-path <>
    recipients: list[str]
    data: bytes
    helo: str | None = None
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" when STARTTLS was used
    auth_user: str | None = None
    smtputf8: bool = False
    body: str | None = None  # the MAIL BODY= parameter: "8BITMIME", "7BIT" or None
    client: tuple[str, int] = ("", 0)
    _parsed: dict[str, email.message.EmailMessage] = field(default_factory=dict, repr=False)

    @property
    def message(self) -> email.message.EmailMessage:
        """``data`` parsed with ``email.policy.default`` (parsed once, on first use).

        Line ends become ``\n`` first, as Python's email package works internally, so
        ``get_content()`` gives text a test can compare with a string literal. The
        server refuses bare CR and LF, so this loses nothing; ``data`` keeps the CRLFs.
        """
        if "m" not in self._parsed:
            parsed = email.message_from_bytes(
                self.data.replace(b"\r\n", b"\n"), policy=email.policy.default
            )
            assert isinstance(parsed, email.message.EmailMessage)
            self._parsed["m"] = parsed
        return self._parsed["m"]

    def __repr__(self) -> str:
        return (
            f"CapturedMessage(sender={self.sender!r}, recipients={self.recipients!r}, "
            f"subject={self.message.get('Subject')!r}, {len(self.data)} bytes)"
        )


class MessagesNotReceived(AssertionError, TimeoutError):
    """``wait_for`` ran out of time: fewer messages arrived than the test expected.

    An ``AssertionError`` so pytest reports it as a failed expectation, and a
    ``TimeoutError`` for code that waits with a timeout in mind.
    """


def _summary(messages: list[CapturedMessage]) -> str:
    lines = []
    for number, msg in enumerate(messages, 1):
        to = ", ".join(f"<{r}>" for r in msg.recipients)
        lines.append(
            f"  #{number} from <{msg.sender}> to {to}, Subject: {msg.message.get('Subject')!r}"
        )
    return "\n".join(lines)


def _not_received(
    wanted: int, timeout: float, where: str, messages: list[CapturedMessage]
) -> MessagesNotReceived:
    noun = "message" if wanted == 1 else "messages"
    if not messages:
        return MessagesNotReceived(
            f"expected {wanted} {noun} at {where}, none arrived within {timeout} s "
            "(did the code under test send mail to this host and port?)"
        )
    return MessagesNotReceived(
        f"expected {wanted} {noun} at {where}, only {len(messages)} arrived within "
        f"{timeout} s:\n{_summary(messages)}"
    )


def _without_trace(data: bytes, hostname: str) -> bytes:
    """The message as the client sent it: the server's own ``Received:`` field removed.

    The handler gets the field prepended (trio_mta.server.headers.received_header):
    a first line, continuation lines up to and including the "by" line, then exactly
    one line (the date). Only our own field is scanned, never the client's bytes.
    """
    if not data.startswith(b"Received: from "):
        raise RuntimeError("capture: the server's trace header was not where expected")
    marker = f"\tby {hostname} (trio_mta) with ".encode()
    end = data.index(b"\r\n") + 2
    while not data.startswith(marker, end):
        if data[end : end + 1] != b"\t":
            raise RuntimeError("capture: the server's trace header has an unknown form")
        end = data.index(b"\r\n", end) + 2
    end = data.index(b"\r\n", end) + 2  # the by-line
    end = data.index(b"\r\n", end) + 2  # the date line
    return data[end:]


def _lone(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (trio's strict nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _Recorder(Handler):
    """Accept every recipient; keep every message."""

    def __init__(self, capture: _CaptureBase) -> None:
        self.capture = capture

    async def handle_rcpt(self, session: SessionInfo, envelope: Envelope, address: str) -> Reply:
        return Reply(250, "2.1.5", "Ok")

    async def handle_message(self, session: SessionInfo, envelope: Envelope, data: bytes) -> Reply:
        captured = CapturedMessage(
            sender=envelope.sender_address,
            recipients=[r.address for r in envelope.recipients],
            data=_without_trace(data, self.capture.hostname),
            helo=session.helo,
            tls=session.tls,
            auth_user=session.auth_user,
            smtputf8=envelope.params.smtputf8,
            body=envelope.params.body,
            client=(session.client_ip, session.client_port),
        )
        number = self.capture._record(captured)
        return Reply(250, "2.0.0", f"Ok: captured as message {number}")


class _CaptureBase:
    """Configuration, certificates and the message list both flavours share."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hostname: str = DEFAULT_HOSTNAME,
        users: Mapping[str, str] | None = None,
        max_message_size: int = 36700160,
        max_recipients: int = 1000,
    ) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname
        self._users = dict(users or {})
        self._max_message_size = max_message_size
        self._max_recipients = max_recipients
        self._messages: list[CapturedMessage] = []
        self._lock = threading.Lock()
        self._tmp: Path | None = None

    # -- what tests use ---------------------------------------------------------

    @property
    def messages(self) -> list[CapturedMessage]:
        """The messages held so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        """Forget the messages held so far; ``wait_for`` counts from zero again."""
        with self._lock:
            self._messages.clear()

    @property
    def cafile(self) -> Path:
        """PEM file of the CA that signed the STARTTLS certificate (while running)."""
        if self._tmp is None:
            raise RuntimeError("the capture server is not running")
        return self._tmp / "ca.pem"

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the server (names localhost, 127.0.0.1, ::1)."""
        return client_context()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    # -- the server side ----------------------------------------------------------

    def _record(self, message: CapturedMessage) -> int:
        with self._lock:
            self._messages.append(message)
            return len(self._messages)

    def _prepare(self) -> Config:
        """A temporary state folder with the certificate pair and users; the config."""
        from trio_mta.config import Config
        from trio_mta.server.passwords import PasswordFile

        tmp = Path(tempfile.mkdtemp(prefix="trio-mta-capture-"))
        self._tmp = tmp
        pems = test_certificates()
        (tmp / "ca.pem").write_bytes(pems.ca_pem)
        (tmp / "cert.pem").write_bytes(pems.cert_pem)
        (tmp / "key.pem").write_bytes(pems.key_pem)
        passwords = PasswordFile(tmp / "passwd")
        for user, password in self._users.items():
            passwords.set_password(user, password)
        data: dict[str, Any] = {
            "hostname": self.hostname,
            "state_dir": str(tmp),
            "listen": [
                {
                    "address": f"[{self.host}]:{self.port}"
                    if ":" in self.host
                    else f"{self.host}:{self.port}",
                    "mode": "smtp",
                }
            ],
            "tls": {"cert": str(tmp / "cert.pem"), "key": str(tmp / "key.pem")},
            # Nobody is trusted, so the server adds no Message-ID or Date (RFC 6409 §8):
            # the test sees what its application wrote.
            "relay": {"trusted_networks": []},
            # ... and checks nothing (SPEC §9 would add Authentication-Results and ask
            # the machine's resolver about every sender): .data stays what was sent.
            "verify": {"spf": False, "dkim": False, "dmarc": False},
            "auth": {"users_file": str(tmp / "passwd")},
            "limits": {
                "max_message_size": self._max_message_size,
                "max_recipients": self._max_recipients,
                "max_connections": _CONNECTIONS,
                "max_connections_per_ip": _CONNECTIONS,
            },
        }
        return Config.from_mapping(data, base_dir=tmp)

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def _serve(self, config: Config, *, task_status: trio.TaskStatus[None]) -> None:
        """Run the server; started() once it listens, with host and port resolved."""
        from trio_mta.mta import serve

        try:
            async with trio.open_nursery() as nursery:
                mta = await nursery.start(
                    functools.partial(serve, config, handler=_Recorder(self), queue=False)
                )
                self.host, self.port = mta.address("smtp")
                task_status.started()
        except BaseExceptionGroup as group:
            # A port in use is a ListenError, not "Exceptions from Trio nursery".
            lone = _lone(group)
            if isinstance(lone, (BaseExceptionGroup, trio.Cancelled)):
                raise
            raise lone from None


class SMTPCapture(_CaptureBase):
    """A capture server in a background thread, for synchronous code::

    with SMTPCapture() as cap:
        smtplib.SMTP(cap.host, cap.port).sendmail(...)
        (msg,) = cap.wait_for(1)
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._arrived = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._cancel: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> SMTPCapture:
        """Start serving; returns once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the capture server is already running")
        self._failure = None
        config = self._prepare()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(config, ready), name=f"SMTPCapture-{id(self):x}", daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._failure is not None:
            failure = self._failure
            self.stop()
            raise RuntimeError(f"the capture server did not start: {failure}") from failure
        return self

    def stop(self) -> None:
        """Stop the server, join its thread and remove its temporary folder."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive() and self._cancel is not None and self._token is not None:
            with suppress(trio.RunFinishedError):  # it stopped on its own meanwhile
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        thread.join()
        self._thread = None
        self._cancel = self._token = None
        self._cleanup()

    def __enter__(self) -> SMTPCapture:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, config: Config, ready: threading.Event) -> None:
        async def main() -> None:
            with trio.CancelScope() as self._cancel:
                self._token = trio.lowlevel.current_trio_token()
                async with trio.open_nursery() as nursery:
                    await nursery.start(functools.partial(self._serve, config))
                    ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # reported to start() or wait_for(), not lost
            self._failure = _lone(exc)
        finally:
            ready.set()
            with self._arrived:
                self._arrived.notify_all()

    def _record(self, message: CapturedMessage) -> int:
        with self._arrived:
            self._messages.append(message)
            self._arrived.notify_all()
            return len(self._messages)

    def wait_for(self, n: int = 1, timeout: float = 5.0) -> list[CapturedMessage]:
        """Block until ``n`` messages are held; return all of them.

        Raises :class:`MessagesNotReceived` naming what did arrive when time runs out.
        """
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self._messages) < n:
                if self._failure is not None:
                    raise RuntimeError(
                        f"the capture server stopped: {self._failure}"
                    ) from self._failure
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _not_received(n, timeout, self._where(), list(self._messages))
                self._arrived.wait(remaining)
            return list(self._messages)


class TrioSMTPCapture(_CaptureBase):
    """A capture server that runs in the caller's nursery, for trio code::

    capture = await nursery.start(TrioSMTPCapture().serve)
    await trio_mta.send_message(msg, host=capture.host, port=capture.port)
    (captured,) = await capture.wait_for(1)
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._changed: trio.Event | None = None
        self._done: trio.Event | None = None
        self._cancel: trio.CancelScope | None = None

    async def serve(
        self, *, task_status: trio.TaskStatus[TrioSMTPCapture] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled or :meth:`aclose`; started() once it accepts connections."""
        if self._done is not None:
            raise RuntimeError("the capture server is already running")
        self._done = trio.Event()
        self._changed = trio.Event()
        try:
            config = await trio.to_thread.run_sync(self._prepare)
            with trio.CancelScope() as self._cancel:
                async with trio.open_nursery() as nursery:
                    await nursery.start(functools.partial(self._serve, config))
                    task_status.started(self)
        finally:
            # Synchronous on purpose: this also runs when the caller's scope is cancelled,
            # and removing three small files cannot be left for later.
            self._cleanup()
            self._done.set()
            self._done = None

    async def aclose(self) -> None:
        """Stop serving and wait until the listener and every session are closed."""
        done = self._done
        if done is None or self._cancel is None:
            return
        self._cancel.cancel()
        await done.wait()

    def _record(self, message: CapturedMessage) -> int:
        number = super()._record(message)
        if self._changed is not None:
            self._changed.set()
            self._changed = trio.Event()
        return number

    async def wait_for(self, n: int = 1, timeout: float = 5.0) -> list[CapturedMessage]:
        """Wait until ``n`` messages are held; return all of them.

        Raises :class:`MessagesNotReceived` naming what did arrive when time runs out.
        """
        with trio.move_on_after(timeout):
            while len(self._messages) < n:
                if self._changed is None:
                    raise RuntimeError("the capture server is not running")
                await self._changed.wait()
            return self.messages
        raise _not_received(n, timeout, self._where(), self.messages)


@asynccontextmanager
async def open_capture(**options: Any) -> AsyncIterator[TrioSMTPCapture]:
    """``async with open_capture() as capture:``: a TrioSMTPCapture for the block's length."""
    async with trio.open_nursery() as nursery:
        capture: TrioSMTPCapture = await nursery.start(TrioSMTPCapture(**options).serve)
        try:
            yield capture
        finally:
            await capture.aclose()
