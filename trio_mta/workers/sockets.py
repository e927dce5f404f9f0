"""The parent binds every listener once per worker, with SO_REUSEPORT.

Why one socket per worker rather than one socket shared by all: with a shared
socket every idle worker wakes for each connection and the first to call
``accept()`` wins (a thundering herd, and the least loaded worker is not
the one that tends to win under epoll). With SO_REUSEPORT the kernel hashes
each new connection onto one socket of the group, so each worker accepts
only its own share and never wakes for another's. The cost is that a
connection hashed to a dead worker waits for its restart; because the parent
keeps every socket open, it waits in that socket's backlog instead of being
reset, and the restarted worker picks it up. Where SO_REUSEPORT is missing,
one socket is shared by every worker.

SO_REUSEPORT would also let a second trio-mta of the same user join the group
silently; a plain bind of the address first (``_check_free``) keeps "address
already in use" a one-line error, as with one process. The parent binds, so a
later privilege drop can bind low ports as root before giving them away.
"""

from __future__ import annotations

import socket

from trio_mta.config import ListenConfig
from trio_mta.server.errors import listening_socket

HAVE_REUSEPORT = hasattr(socket, "SO_REUSEPORT")


def bind_group(listen: ListenConfig, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address (the same one ``count`` times without
    SO_REUSEPORT); raises :class:`ListenError` naming the address."""
    reuseport = HAVE_REUSEPORT and count > 1
    if reuseport and listen.port:
        listening_socket(listen, listen.port, reuseport=False, listening=False).close()
    first = listening_socket(listen, listen.port, reuseport=reuseport, listening=True)
    if not reuseport:
        return [first] * count
    group = [first]
    port = first.getsockname()[1]  # port 0: the others join the port the kernel chose
    try:
        while len(group) < count:
            group.append(listening_socket(listen, port, reuseport=True, listening=True))
    except BaseException:
        for sock in group:
            sock.close()
        raise
    return group
