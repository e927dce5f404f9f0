"""One SMTP connection: the trio glue around the sans-IO ``ServerConnection``.

The protocol machine decides *what* the conversation means; this module owns
what needs I/O or policy: timeouts, TLS wrapping, password checks, routing
verdicts, and handing the message to its sink. Replies are flushed only when
the machine needs more input, so pipelined commands (RFC 2920) get their
replies in one write, in order.
"""

from __future__ import annotations

import contextlib
import math
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from trio_mta import log
from trio_mta.auth.inbound import Check
from trio_mta.auth.service import MailAuth
from trio_mta.config import Config
from trio_mta.metrics import Metrics
from trio_mta.milter.apply import Accepted, run_milters
from trio_mta.milter.chain import MilterChain
from trio_mta.milter.pool import MilterPool
from trio_mta.queue.bodies import MessageContent
from trio_mta.queue.ids import new_queue_id
from trio_mta.queue.spool import DEFAULT_THRESHOLD, Spool
from trio_mta.routing.router import Router, control_character, unsafe_sender
from trio_mta.server.envelope import Envelope, MessageSink, Recipient, SessionInfo
from trio_mta.server.handler import Handler, as_reply, guarded_hook
from trio_mta.server.headers import TraceInfo, received_header, submission_headers
from trio_mta.server.limits import ConnectionLimits
from trio_mta.server.passwords import PasswordFile
from trio_mta.server.proxied import PROXY_HEADER_TIMEOUT
from trio_mta.smtp import (
    NEED_DATA,
    AuthAttempt,
    BodyChunk,
    ConnectionClosed,
    DataStarted,
    EndOfMessage,
    Hello,
    MailFrom,
    MessageRefused,
    Quit,
    RcptTo,
    Reply,
    ServerConnection,
    StartTlsRequest,
    TransactionReset,
)
from trio_mta.tls import describe

RECEIVE_SIZE = 65536
# How far a connection's deadline may lag behind the exact timeout (seconds): see _arm.
DEADLINE_SLACK = 1.0
MAX_AUTH_FAILURES = 3
# An smtps client refused for the connection limits gets its 421 inside TLS;
# these bound the handshakes spent on clients we are refusing anyway.
REFUSAL_HANDSHAKE_TIMEOUT = 5.0
MAX_REFUSAL_HANDSHAKES = 8


@dataclass
class ServerState:
    """What every session of one server shares; swapped wholesale on reload."""

    config: Config
    router: Router
    sink: MessageSink
    limits: ConnectionLimits
    ssl_context: ssl.SSLContext | None
    passwords: PasswordFile | None
    host_tag: str
    handler: Handler | None = None
    metrics: Metrics | None = None
    auth_limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(2))
    refusal_handshakes: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(MAX_REFUSAL_HANDSHAKES)
    )
    auth_failure_delay: float = 1.0
    proxy_header_timeout: float = PROXY_HEADER_TIMEOUT
    shutdown_grace: float = 30.0
    shutting_down: bool = False
    sessions: set[Session] = field(default_factory=set)
    mail_auth: MailAuth | None = None  # DKIM signing, SPF/DKIM/DMARC checks (SPEC §9)
    milter_pool: MilterPool = field(default_factory=MilterPool)  # kept milter connections
    # Bodies past spool_threshold go to files here as they arrive (queue/spool.py),
    # written by at most 8 worker threads at a time.
    spool_dir: Path = Path("spool")
    spool_threshold: int = DEFAULT_THRESHOLD
    spool_limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(8))

    def begin_shutdown(self) -> None:
        """Idle sessions leave at once (421 4.3.2); busy ones finish their transaction."""
        self.shutting_down = True
        for session in list(self.sessions):
            session.interrupt_if_idle()


class _Timeout(Exception):
    """The peer went quiet past command_timeout/data_timeout."""


class _ShutdownWhileIdle(Exception):
    """The server is stopping and this session has no transaction in progress."""


class Session:
    """Runs one connection from banner to close."""

    def __init__(
        self,
        state: ServerState,
        stream: trio.abc.Stream,
        mode: str,
        client_ip: str,
        client_port: int,
        *,
        proxy: str | None = None,
    ) -> None:
        self.state = state
        self.stream = stream
        self.mode = mode
        # Behind a PROXY-protocol listener: the header's client; ``proxy`` is the peer.
        self.client_ip = client_ip
        self.client_port = client_port
        self.proxy = proxy
        self.tls: str | None = None
        self.envelope: Envelope | None = None
        self.auth_check: Check | None = None  # this transaction's SPEC §9 checks
        self.spool: Spool | None = None
        self.auth_failures = 0
        self._io: trio.CancelScope | None = None
        self._idle = False
        self._interrupted = False
        cfg = state.config
        self.trusted = state.router.is_trusted(client_ip)
        self.conn: ServerConnection | None = None
        self.limits = cfg.limits
        self.milters: MilterChain | None = None

    # -- shutdown -------------------------------------------------------------

    def interrupt_if_idle(self) -> None:
        if self._idle and self._io is not None:
            self._interrupted = True
            self._io.cancel()

    # -- I/O helpers ----------------------------------------------------------
    #
    # One cancel scope (``_io``) bounds the whole conversation; each read and
    # each write moves its deadline (command_timeout, or data_timeout inside
    # DATA), so a client that stops reading is dropped like one that stops
    # writing, even after our own unbounded work (``_no_deadline``). One scope
    # per connection instead of one per read and write: scope set-up was a
    # tenth of the server's CPU per message.

    def _arm(self) -> None:
        """Give the client's next read or write the timeout its phase allows.

        Moving a cancel scope's deadline re-sorts trio's deadline heap, which cost
        as much as the protocol work when done on every read and write. Timeouts
        are minutes long, so the deadline only moves when it would move by more
        than ``DEADLINE_SLACK`` (or a twentieth of a short timeout), or back
        (entering a phase with a shorter timeout).
        """
        assert self.conn is not None and self._io is not None
        limits = self.limits
        timeout = limits.data_timeout if self.conn.in_data else limits.command_timeout
        wanted = trio.current_time() + timeout
        current = self._io.deadline
        if wanted < current or wanted - current > min(DEADLINE_SLACK, timeout / 20):
            self._io.deadline = wanted

    async def _flush(self) -> None:
        assert self.conn is not None
        out = self.conn.data_to_send()
        if out:
            self._arm()
            await self.stream.send_all(out)

    async def _send_now(self, reply: Reply) -> None:
        """Write one reply directly, outside the machine (banner refusals, timeouts).

        Best effort: after a timeout cancelled a write, a TLS stream is broken
        and the client gets no goodbye, which must not turn into a session error.
        """
        with trio.move_on_after(5):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self.stream.send_all(reply.format())

    async def _receive(self) -> bytes:
        assert self.conn is not None and self._io is not None
        in_data = self.conn.in_data
        self._idle = self.envelope is None and not in_data
        if self._idle and self.state.shutting_down:
            raise _ShutdownWhileIdle
        self._arm()
        try:
            return bytes(await self.stream.receive_some(RECEIVE_SIZE))
        finally:
            self._idle = False

    def _no_deadline(self) -> None:
        """Work of ours (queue commit, password check) is not bounded by the client's timeouts."""
        if self._io is not None:
            self._io.deadline = math.inf

    # -- the connection -------------------------------------------------------

    async def run(self) -> None:
        state = self.state
        cfg = state.config
        refusal = state.limits.over_limit(self.client_ip)
        if refusal is not None:
            log.warning("smtpd.refused", client=self.client_ip, reason=refusal)
            try:
                await self._refuse(Reply(421, "4.7.0", f"{cfg.hostname} Error: {refusal}"))
            finally:
                with trio.move_on_after(2):  # TLS close_notify may block
                    await self.stream.aclose()
            return
        metrics = state.metrics
        with state.limits.admit(self.client_ip):
            state.sessions.add(self)
            if metrics is not None:
                metrics.connection_opened(self.mode, self.mode == "smtps")
            try:
                await self._converse()
            finally:
                self._discard_body()  # a client gone mid-DATA leaves no spool file
                state.sessions.discard(self)
                if metrics is not None:
                    metrics.connection_closed(self.mode)
                with trio.CancelScope(shield=True) as closing:
                    closing.deadline = trio.current_time() + 2  # TLS close_notify may block
                    await self.stream.aclose()

    async def _refuse(self, reply: Reply) -> None:
        """Say ``reply`` before any conversation; on smtps inside TLS.

        A clear-text 421 on an smtps port is garbage to the client's TLS stack
        (WRONG_VERSION_NUMBER), so the handshake comes first, briefly. When
        more refused clients are already handshaking (a flood), the
        connection closes without a word instead of spending more on them.
        """
        if self.mode == "smtps":
            try:
                self.state.refusal_handshakes.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                if not await self._handshake(REFUSAL_HANDSHAKE_TIMEOUT):
                    return
            finally:
                self.state.refusal_handshakes.release()
        await self._send_now(reply)

    async def _converse(self) -> None:
        cfg = self.state.config
        log.event(
            "smtpd.connect",
            client=self.client_ip,
            port=self.client_port,
            mode=self.mode,
            proxy=self.proxy,
        )
        try:
            if self.mode == "smtps" and not await self._handshake():
                return
            self.conn = self._new_machine()
            await self._milter_connect()
            self.conn.send_reply(Reply(220, None, f"{cfg.hostname} ESMTP trio_mta"))
            with trio.CancelScope() as self._io:
                await self._loop()
            if self._io.cancelled_caught:
                raise _ShutdownWhileIdle if self._interrupted else _Timeout("idle")
        except _Timeout:
            log.event(
                "smtpd.timeout",
                client=self.client_ip,
                in_data=bool(self.conn and self.conn.in_data),
            )
            await self._send_now(Reply(421, "4.4.2", f"{cfg.hostname} Error: timeout exceeded"))
        except _ShutdownWhileIdle:
            await self._send_now(Reply(421, "4.3.2", f"{cfg.hostname} Service shutting down"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.event("smtpd.lost", client=self.client_ip, error=str(exc) or type(exc).__name__)
        finally:
            if self.milters is not None:
                await self.milters.close()
            log.event("smtpd.disconnect", client=self.client_ip)

    def _new_machine(self) -> ServerConnection:
        cfg = self.state.config
        tls_possible = self.state.ssl_context is not None
        return ServerConnection(
            hostname=cfg.hostname,
            max_message_size=cfg.limits.max_message_size,
            max_recipients=cfg.limits.max_recipients,
            starttls=tls_possible and self.tls is None,
            tls_active=self.tls is not None,
            auth_mechanisms=("PLAIN", "LOGIN") if self.state.passwords is not None else (),
        )

    async def _handshake(self, timeout: float | None = None) -> bool:
        """Wrap the stream in TLS; False (connection over) when the handshake fails."""
        ctx = self.state.ssl_context
        if ctx is None:
            return False
        tls_stream = trio.SSLStream(self.stream, ctx, server_side=True)
        limit = (
            self.limits.command_timeout
            if timeout is None
            else min(timeout, self.limits.command_timeout)
        )
        with trio.move_on_after(limit) as scope:
            try:
                await tls_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__ or exc
                self._tls_failed(str(cause))
                return False
        if scope.cancelled_caught:
            self._tls_failed("handshake timeout")
            return False
        self.stream = tls_stream
        self.tls = describe(tls_stream)
        log.event("smtpd.tls", client=self.client_ip, tls=self.tls)
        return True

    def _tls_failed(self, error: str) -> None:
        log.warning("smtpd.tls_failed", client=self.client_ip, error=error)
        if self.state.metrics is not None:
            self.state.metrics.tls_handshake_failed(self.mode)

    def _rejected(self, reply: Reply, reason: str | None = None) -> None:
        """Count a refusal by reason; the reason follows from the reply when not given."""
        metrics = self.state.metrics
        if metrics is None:
            return
        if reason is None:
            reason = {
                "5.7.1": "relay_denied",
                "5.1.1": "unknown_user",
                "5.3.4": "too_big",
                "5.5.2": "bad_line_ending",
                "4.3.0": "queue_error",
                "5.7.0": "auth_required",
            }.get(reply.status or "", "other")
        metrics.message_rejected(reason)

    async def _loop(self) -> None:
        assert self.conn is not None
        while True:
            conn = self.conn
            event = conn.next_event()
            if event is NEED_DATA:
                await self._flush()
                conn.receive_data(await self._receive())
            elif isinstance(event, BodyChunk):
                await self._body().write(event.data)
            elif isinstance(event, Hello):
                log.debug("smtpd.helo", client=self.client_ip, helo=event.name, esmtp=event.esmtp)
                if self.milters is not None:
                    self._no_deadline()
                    await self.milters.helo(event.name)
            elif isinstance(event, MailFrom):
                conn.send_reply(await self._mail(event))
            elif isinstance(event, RcptTo):
                conn.send_reply(await self._rcpt(event))
            elif isinstance(event, DataStarted):
                self._discard_body()
            elif isinstance(event, EndOfMessage):
                conn.send_reply(await self._end_of_message())
            elif isinstance(event, MessageRefused):
                log.event(
                    "smtpd.reject",
                    client=self.client_ip,
                    code=event.reply.code,
                    reply=str(event.reply),
                )
                self._rejected(event.reply)
                self._reset()
            elif isinstance(event, TransactionReset):
                self._reset()
            elif isinstance(event, StartTlsRequest):
                if not await self._starttls():
                    return
            elif isinstance(event, AuthAttempt):
                conn.send_reply(await self._auth(event))
                if self.auth_failures >= MAX_AUTH_FAILURES:
                    await self._flush()
                    await self._send_now(Reply(421, "4.7.0", "Too many failed authentications"))
                    return
            elif isinstance(event, (Quit, ConnectionClosed)):
                await self._flush()
                return

    def _reset(self) -> None:
        self.envelope = None
        if self.milters is not None:
            self.milters.reset()
        self.auth_check = None
        self._discard_body()

    def _body(self) -> Spool:
        if self.spool is None:
            self.spool = self._new_spool()
        return self.spool

    def _new_spool(self) -> Spool:
        state = self.state
        return Spool(state.spool_dir, threshold=state.spool_threshold, limiter=state.spool_limiter)

    def _discard_body(self) -> None:
        if self.spool is not None:
            self.spool.discard()
            self.spool = None

    # -- policy -----------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        return self.conn is not None and self.conn.authenticated_user is not None

    async def _mail(self, event: MailFrom) -> Reply:
        if self.mode != "smtp" and not self.authenticated:
            # SPEC §3: submission and smtps require AUTH before MAIL (RFC 4954 §6).
            reply = Reply(530, "5.7.0", "Authentication required")
            self._rejected(reply)
            return reply
        refusal = unsafe_sender(str(event.path))
        if refusal is not None:
            log.event(
                "smtpd.reject",
                client=self.client_ip,
                sender=str(event.path),
                code=refusal.code,
                reply=str(refusal),
            )
            self._rejected(refusal)
            return refusal
        if self.milters is not None:
            self._no_deadline()
            refusal = await self.milters.mail(str(event.path), [], self._milter_macros())
            if refusal is not None:
                log.event(
                    "smtpd.reject",
                    client=self.client_ip,
                    sender=str(event.path),
                    code=refusal.code,
                    reply=str(refusal),
                    milter=True,
                )
                self._rejected(refusal, "milter")
                return refusal
        self.envelope = Envelope(sender=event.path, params=event.params)
        if self.state.mail_auth is not None:
            assert self.conn is not None
            self.auth_check = self.state.mail_auth.check(
                mode=self.mode,
                trusted=self.trusted,
                authenticated=self.authenticated,
                client_ip=self.client_ip,
                sender=str(event.path),
                helo=self.conn.helo_name,
            )
        return Reply(250, "2.1.0", "Ok")

    async def _rcpt(self, event: RcptTo) -> Reply:
        assert self.envelope is not None
        address = str(event.path)
        if self.auth_check is not None and self.auth_check.enforces_spf:
            self._no_deadline()  # SPF has its own time limit
            refusal = await self.auth_check.at_rcpt()
            if refusal is not None:  # [verify] spf_enforce
                log.event(
                    "smtpd.reject",
                    client=self.client_ip,
                    rcpt=address,
                    code=refusal.code,
                    reply=str(refusal),
                    spf="fail",
                )
                self._rejected(refusal, "spf_fail")
                return refusal
        router = self.state.router
        handler = self.state.handler
        decided = None
        # An address with control characters is refused by the router (553 5.1.3)
        # before any handler could vouch for it and let it reach the headers.
        if handler is not None and control_character(address) is None:
            decided = await guarded_hook(
                handler.handle_rcpt(self._info(), self.envelope, address), "handle_rcpt"
            )
        if decided is not None:
            reply = as_reply(decided)
            if reply.code < 400:
                # The application vouches for this recipient; if the message later
                # falls through to the queue it goes where routing would send it.
                self.envelope.recipients.append(
                    Recipient(address, router.expand(address), event.params)
                )
        else:
            verdict = router.check_recipient(
                address, client_ip=self.client_ip, authenticated=self.authenticated
            )
            reply = verdict.reply
            if verdict.accepted:
                refusal = await self._milter_rcpt(address)
                if refusal is None:
                    self.envelope.recipients.append(
                        Recipient(address, verdict.targets, event.params)
                    )
                else:
                    reply = refusal
        if reply.code >= 400:
            log.event(
                "smtpd.reject",
                client=self.client_ip,
                rcpt=address,
                code=reply.code,
                reply=str(reply),
            )
            self._rejected(reply, "handler" if decided is not None else None)
        return reply

    def _info(self) -> SessionInfo:
        assert self.conn is not None
        return SessionInfo(
            listener_mode=self.mode,
            client_ip=self.client_ip,
            client_port=self.client_port,
            helo=self.conn.helo_name,
            esmtp=self.conn.esmtp,
            tls=self.tls,
            auth_user=self.conn.authenticated_user,
            trusted=self.trusted,
        )

    async def _end_of_message(self) -> Reply:
        assert self.conn is not None and self.envelope is not None
        envelope = self.envelope
        spool = self._body()
        self.spool = None
        self.envelope = None
        try:
            return await self._take_message(envelope, spool)
        finally:
            spool.discard()  # the sink renamed the file if it kept it

    async def _take_message(self, envelope: Envelope, spool: Spool) -> Reply:
        cfg = self.state.config
        self._no_deadline()
        try:
            body = await spool.finish()
        except OSError as exc:
            log.error("smtpd.spool_failed", client=self.client_ip, error=str(exc))
            reply = Reply(451, "4.3.0", "Error: queue file write error, try again later")
            self._rejected(reply)
            return reply
        size = spool.size
        queue_id = new_queue_id(self.state.host_tag)
        info = self._info()
        trace = received_header(
            TraceInfo(
                helo=info.helo,
                client_ip=self.client_ip,
                hostname=cfg.hostname,
                queue_id=queue_id,
                esmtp=info.esmtp,
                tls=self.tls,
                auth_user=info.auth_user,
                recipients=tuple(r.address for r in envelope.recipients),
                smtputf8=envelope.params.smtputf8,
            )
        )
        if self.trusted or self.authenticated:
            head = body if isinstance(body, bytes) else spool.first
            trace += submission_headers(head, queue_id=queue_id, hostname=cfg.hostname)
        auth_fields: dict[str, Any] = {}
        check, self.auth_check = self.auth_check, None
        sign = self.trusted or self.authenticated
        mail_auth = self.state.mail_auth
        # SPEC §9: theirs is checked as it arrived, before any milter changes it; ours is
        # signed last, so the signature covers what milters added.
        if mail_auth is not None and not sign:
            done = await mail_auth.end_of_data(
                check, sign=False, body=body, trace=trace, queue_id=queue_id
            )
            body, trace, auth_fields = done.body, done.trace, done.log_fields
            if done.refusal is not None:
                return self._mail_auth_refused(done.refusal, envelope, auth_fields)
        content = MessageContent(trace, body)
        rewritten: Spool | None = None
        if self.milters is not None:
            checked = await run_milters(
                self.milters,
                envelope,
                content,
                spool.first,
                queue_id,
                self.state.router,
                self._new_spool,
            )
            if not isinstance(checked, Accepted):
                return self._milter_refused(checked, envelope, queue_id)
            envelope, content, rewritten = checked.envelope, checked.content, checked.spool
        try:
            if mail_auth is not None and sign:
                done = await mail_auth.end_of_data(
                    None, sign=True, body=content.body, trace=content.head, queue_id=queue_id
                )
                auth_fields = done.log_fields
                if done.refusal is not None:
                    return self._mail_auth_refused(done.refusal, envelope, auth_fields)
                content = MessageContent(done.trace, done.body)
            reply = await self.state.sink.accept(envelope, info, content, queue_id)
        finally:
            if rewritten is not None:
                rewritten.discard()
        metrics = self.state.metrics
        if metrics is not None:
            if reply.code < 400:
                metrics.message_accepted(self.mode, size)
            else:
                self._rejected(reply, None if reply.status == "4.3.0" else "handler")
        log.event(
            "smtpd.accepted" if reply.code < 400 else "smtpd.reject",
            id=queue_id if reply.code < 400 else None,
            client=self.client_ip,
            sender=envelope.sender_address,
            nrcpt=len(envelope.recipients),
            size=size,
            tls=self.tls,
            auth=info.auth_user,
            code=reply.code,
            **auth_fields,
        )
        return reply

    # -- milters (SPEC §11; trio_mta/milter/) ----------------------------------------

    async def _milter_connect(self) -> None:
        specs = self.state.config.milters
        if specs:
            cfg = self.state.config
            self.milters = MilterChain(
                specs,
                {
                    "j": cfg.hostname,
                    "{daemon_name}": cfg.hostname,
                    "v": "trio_mta",
                    "{client_addr}": self.client_ip,
                    "{client_name}": "unknown",
                    "{client_port}": str(self.client_port),
                },
                self.state.milter_pool,
            )
            await self.milters.connect("unknown", self.client_ip, self.client_port)

    def _milter_macros(self) -> dict[str, str]:
        assert self.conn is not None
        macros = {"{auth_authen}": self.conn.authenticated_user or ""}
        if self.tls is not None:
            macros["{tls_version}"] = self.tls.split(" ", 1)[0]
        return macros

    async def _milter_rcpt(self, address: str) -> Reply | None:
        if self.milters is None:
            return None
        self._no_deadline()
        return await self.milters.rcpt(address, [])

    def _milter_refused(self, reply: Reply, envelope: Envelope, queue_id: str) -> Reply:
        if reply.code < 400:  # discarded: acknowledged, never delivered
            return reply
        log.event(
            "smtpd.reject",
            client=self.client_ip,
            sender=envelope.sender_address,
            code=reply.code,
            reply=str(reply),
            milter=True,
        )
        self._rejected(reply, "milter")
        return reply

    def _mail_auth_refused(
        self, refusal: Reply, envelope: Envelope, fields: dict[str, Any]
    ) -> Reply:
        log.event(
            "smtpd.reject",
            client=self.client_ip,
            sender=envelope.sender_address,
            code=refusal.code,
            reply=str(refusal),
            **fields,
        )
        self._rejected(refusal, "dmarc_reject")
        return refusal

    async def _starttls(self) -> bool:
        assert self.conn is not None
        if self.state.ssl_context is None or self.tls is not None:
            self.conn.send_reply(Reply(454, "4.7.0", "TLS not available"))
            return True
        self.conn.send_reply(Reply(220, "2.0.0", "Ready to start TLS"))
        await self._flush()
        if not await self._handshake():
            return False
        # RFC 3207 §4.2: forget everything learned before TLS; EHLO again.
        self.conn.tls_established()
        self._reset()
        return True

    async def _auth(self, event: AuthAttempt) -> Reply:
        self._no_deadline()
        passwords = self.state.passwords
        # RFC 4616 §2: a non-empty authzid other than the authcid asks to act as
        # someone else; we have no proxy authorization, so that is a failure.
        foreign = bool(event.authzid) and event.authzid != event.username
        # No stored user name holds a control character (validate_username), so
        # such a name fails without a password check, with a reply that says why.
        control = control_character(event.username) or control_character(event.authzid)
        ok = (
            not foreign
            and control is None
            and passwords is not None
            and await passwords.verify_async(
                event.username, event.password, limiter=self.state.auth_limiter
            )
        )
        if self.state.metrics is not None:
            self.state.metrics.auth_result(ok)
        if ok:
            log.event(
                "smtpd.auth",
                client=self.client_ip,
                user=event.username,
                mechanism=event.mechanism,
                result="ok",
            )
            return Reply(235, "2.7.0", "Authentication successful")
        self.auth_failures += 1
        log.warning(
            "smtpd.auth",
            client=self.client_ip,
            user=event.username,
            authzid=event.authzid if foreign else None,
            mechanism=event.mechanism,
            result="failed",
            failures=self.auth_failures,
        )
        # A growing pause per failure slows password guessing on one connection.
        await trio.sleep(self.state.auth_failure_delay * self.auth_failures)
        if control is not None:
            text = f"Authentication credentials invalid: {control} not allowed in a user name"
            return Reply(535, "5.7.8", text)
        return Reply(535, "5.7.8", "Authentication credentials invalid")
