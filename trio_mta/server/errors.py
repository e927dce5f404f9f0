"""Binding listeners, and the error that names one, without the rest of the server.

The ``[server] workers`` supervisor binds listeners and reports ``ListenError`` but
never runs a session: taking both from here keeps the session, routing and queue
code (and their memory) out of the supervising process.
"""

from __future__ import annotations

import errno
import socket

from trio_mta.config import ListenConfig
from trio_mta.config.schema import format_host_port

BACKLOG = 1024


class ListenError(Exception):
    """A listener could not be bound, or accept(2) failed for good; the message names it."""


def listening_socket(
    listen: ListenConfig, port: int, *, reuseport: bool = False, listening: bool = True
) -> socket.socket:
    """A bound (and listening) socket for one ``[[listen]]`` address; ``ListenError`` names it.

    "[::]:25" accepts IPv4 too, as operators expect from Postfix; any other IPv6
    address is IPv6 only.
    """
    host = listen.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind((host, port))
        if listening:
            sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        raise ListenError(
            f"cannot listen on {format_host_port(host, port)} ({listen.mode}): {reason}"
        ) from None
    return sock
