"""Binding listeners and running one task per connection.

Binding happens before anything is announced, so a port that cannot be bound
is a one-line error naming the address (``ListenError``), and
``task_status.started`` means every listener already accepts.
"""

from __future__ import annotations

import errno
import math
import socket
from dataclasses import dataclass

import trio

from trio_mta import log
from trio_mta.config import ListenConfig
from trio_mta.config.schema import format_host_port
from trio_mta.server.errors import ListenError, listening_socket
from trio_mta.server.proxied import accept_proxied
from trio_mta.server.session import ServerState, Session
from trio_mta.socket_stream import DirectSocketStream


@dataclass(frozen=True)
class Listener:
    """A bound listener as the embedding API reports it (port 0 resolved)."""

    mode: str
    host: str
    port: int


@dataclass
class BoundListener:
    config: ListenConfig
    socket_listener: trio.SocketListener
    info: Listener


async def bind(listen: ListenConfig) -> BoundListener:
    """Bind one ``[[listen]]`` entry (no wildcard expansion surprises: exactly that address)."""
    sock = trio.socket.from_stdlib_socket(listening_socket(listen, listen.port))
    port = sock.getsockname()[1]
    return BoundListener(
        listen, trio.SocketListener(sock), Listener(listen.mode, listen.host, port)
    )


def adopt(listen: ListenConfig, sock: socket.socket) -> BoundListener:
    """A socket some other process bound and put in listening state (a supervisor)."""
    port = sock.getsockname()[1]
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    return BoundListener(listen, listener, Listener(listen.mode, listen.host, port))


# accept(2) errors that mean "the system is out of something right now", as in
# trio's serve_listeners: pause and retry. Any other error is a broken listener.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_PAUSE = 0.1
# accept(2) errors about one connection that died in the backlog: skip it (as trio does).
ACCEPT_IGNORED_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
# While accept keeps failing for capacity, say so again at most this often.
ACCEPT_LOG_INTERVAL = 60.0


async def accept_loop(bound: BoundListener, state: ServerState, sessions: trio.Nursery) -> None:
    """Accept until cancelled; each connection runs as a task in ``sessions``.

    Running out of file descriptors or memory pauses accepting (logged once when
    it starts, then at most once a minute, and once when it ends); any other
    accept error ends the server with a ``ListenError`` naming the listener.
    """
    listener = bound.socket_listener
    mode = bound.config.mode
    where = f"{format_host_port(bound.info.host, bound.info.port)} ({mode})"
    failures = 0
    logged_at = -math.inf
    listening = listener.socket
    family = listening.family
    async with listener:
        while True:
            try:
                accepted, _ = await listening.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_IGNORED_ERRNOS:
                    continue
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise ListenError(
                        f"accepting on {where} failed: {exc.strerror or exc}"
                    ) from exc
                failures += 1
                now = trio.current_time()
                if now - logged_at >= ACCEPT_LOG_INTERVAL:
                    logged_at = now
                    log.error(
                        "smtpd.accept_paused",
                        listener=where,
                        error=errno.errorcode.get(exc.errno or 0, str(exc)),
                        failures=failures,
                        retry=ACCEPT_PAUSE,
                    )
                await trio.sleep(ACCEPT_PAUSE)
                continue
            if failures:
                log.warning("smtpd.accept_resumed", listener=where, failures=failures)
                failures, logged_at = 0, -math.inf
            # The session's hot path runs on a stream that tries each send/recv first
            # (socket_stream.py): the socket leaves trio's wrapper here.
            raw = socket.socket(family, socket.SOCK_STREAM, 0, accepted.detach())
            sessions.start_soon(_handle, DirectSocketStream(raw), state, bound.config)


async def _handle(stream: DirectSocketStream, state: ServerState, listen: ListenConfig) -> None:
    """A connection's task: a bug in one session is logged, never fatal to the server.

    Behind a proxy (``proxy_protocol``) the PROXY header is read first and its
    client address is the one the session sees (:mod:`trio_mta.server.proxied`).
    """
    try:
        peer = stream.socket.getpeername()
    except OSError:
        await stream.aclose()
        return
    ip = str(peer[0])
    if ip.startswith("::ffff:"):
        ip = ip[7:]
    port = int(peer[1])
    session_stream: trio.abc.Stream = stream
    proxy: str | None = None
    try:
        if listen.proxy_protocol:
            proxied = await accept_proxied(stream, listen, ip, port, state.proxy_header_timeout)
            if proxied is None:
                with trio.move_on_after(2):
                    await stream.aclose()
                return
            session_stream, proxy = proxied.stream, ip
            ip, port = proxied.client_ip, proxied.client_port
        await Session(state, session_stream, listen.mode, ip, port, proxy=proxy).run()
    except Exception as exc:
        log.error("smtpd.session_error", client=ip, error=f"{type(exc).__name__}: {exc}")
