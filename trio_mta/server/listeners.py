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
from trio_mta.server.session import ServerState, Session
from trio_mta.server.socket_stream import DirectSocketStream


class ListenError(Exception):
    """A listener could not be bound, or accept(2) failed for good; the message names it."""


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
    host = listen.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "[::]:25" should accept IPv4 too, as operators expect from Postfix.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        await sock.bind((host, listen.port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        raise ListenError(
            f"cannot listen on {format_host_port(host, listen.port)} ({listen.mode}): {reason}"
        ) from None
    port = sock.getsockname()[1]
    return BoundListener(listen, trio.SocketListener(sock), Listener(listen.mode, host, port))


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


async def accept_loop(bound: BoundListener, state: ServerState,
                      sessions: trio.Nursery) -> None:
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
                        f"accepting on {where} failed: {exc.strerror or exc}") from exc
                failures += 1
                now = trio.current_time()
                if now - logged_at >= ACCEPT_LOG_INTERVAL:
                    logged_at = now
                    log.error("smtpd.accept_paused", listener=where,
                              error=errno.errorcode.get(exc.errno or 0, str(exc)),
                              failures=failures, retry=ACCEPT_PAUSE)
                await trio.sleep(ACCEPT_PAUSE)
                continue
            if failures:
                log.warning("smtpd.accept_resumed", listener=where, failures=failures)
                failures, logged_at = 0, -math.inf
            # The session's hot path runs on a stream that tries each send/recv first
            # (server/socket_stream.py): the socket leaves trio's wrapper here.
            raw = socket.socket(family, socket.SOCK_STREAM, 0, accepted.detach())
            sessions.start_soon(_handle, DirectSocketStream(raw), state, mode)


async def _handle(stream: DirectSocketStream, state: ServerState, mode: str) -> None:
    """A connection's task: a bug in one session is logged, never fatal to the server."""
    try:
        peer = stream.socket.getpeername()
    except OSError:
        await stream.aclose()
        return
    ip = str(peer[0])
    if ip.startswith("::ffff:"):
        ip = ip[7:]
    try:
        await Session(state, stream, mode, ip, int(peer[1])).run()
    except Exception as exc:
        log.error("smtpd.session_error", client=ip, error=f"{type(exc).__name__}: {exc}")
