"""Binding listeners and running one task per connection.

Binding happens before anything is announced, so a port that cannot be bound
is a one-line error naming the address (``ListenError``), and
``task_status.started`` means every listener already accepts.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

import trio

from trio_mta import log
from trio_mta.config import ListenConfig
from trio_mta.config.schema import format_host_port
from trio_mta.server.session import ServerState, Session


class ListenError(Exception):
    """A listener could not be bound; the message names the address."""


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


async def accept_loop(bound: BoundListener, state: ServerState,
                      sessions: trio.Nursery) -> None:
    """Accept until cancelled; each connection runs as a task in ``sessions``."""
    listener = bound.socket_listener
    mode = bound.config.mode
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning, as trio's
                # serve_listeners does.
                log.error("smtpd.accept_failed", listener=bound.info.port, error=str(exc))
                await trio.sleep(0.1)
                continue
            sessions.start_soon(_handle, stream, state, mode)


async def _handle(stream: trio.SocketStream, state: ServerState, mode: str) -> None:
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
