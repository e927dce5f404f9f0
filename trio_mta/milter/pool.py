"""Milter connections kept between SMTP sessions, for milters that allow it.

A session normally opens its own connection to each milter and ends it with
SMFIC_QUIT, so every SMTP connection also pays a milter connect and an option
negotiation, and the milter pays its own per-connection setup. With
``reuse_connections = true`` a session ends instead with SMFIC_QUIT_NC ("quit,
new connection follows"): the milter resets to its state after negotiation,
and the next session starts at SMFIC_CONNECT on the same socket.

Only some milters implement that (rspamd does; on libmilter, as OpenDKIM and
OpenDMARC are, the next session fails), which is why it is off unless a
``[[milter]]`` asks for it. A kept connection is given out again only when it
has been idle for less than :data:`IDLE_MAX` and nothing is waiting to be read
on it (an idle milter that closed it, or sent anything, makes it unfit).
"""

from __future__ import annotations

import select
from collections import deque

import trio

from trio_mta.milter.client import MilterClient, MilterSpec

IDLE_MAX = 30.0  # seconds; well below the idle timeouts milters apply to a silent MTA
MAX_IDLE_PER_MILTER = 64


def _unfit(client: MilterClient) -> bool:
    """Readable while idle: the milter closed the connection or broke the protocol.

    poll(), not select(): an MX with thousands of connections has descriptors past
    select's FD_SETSIZE, where select() refuses and every kept connection would look
    unfit."""
    sock = getattr(client.stream, "socket", None)
    if sock is None:
        return True
    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class MilterPool:
    """Idle, negotiated connections per ``[[milter]]``, newest given out first."""

    def __init__(self) -> None:
        self._idle: dict[MilterSpec, deque[tuple[float, MilterClient]]] = {}
        self.closed = False
        self.created = 0  # clients that had to connect afresh (for tests and benchmarks)

    def idle_count(self) -> int:
        return sum(len(kept) for kept in self._idle.values())

    async def acquire(self, spec: MilterSpec) -> MilterClient:
        """A kept connection for ``spec`` when one is fit, else a new, unopened client."""
        if spec.reuse_connections:
            kept = self._idle.get(spec)
            now = trio.current_time()
            while kept:
                since, client = kept.pop()
                if now - since < IDLE_MAX and not _unfit(client):
                    client.kept = True
                    return client
                await client.discard()
        self.created += 1
        return MilterClient(spec)

    async def release(self, client: MilterClient) -> None:
        """End ``client``'s session: kept for the next one when its milter allows it and
        the conversation is at a clean point, else SMFIC_QUIT and closed."""
        spec = client.spec
        await self._expire()
        if not spec.reuse_connections or self.closed:
            await client.close()
            return
        kept = self._idle.setdefault(spec, deque())
        if len(kept) >= MAX_IDLE_PER_MILTER or not await client.quit_for_reuse():
            await client.close()
            return
        kept.append((trio.current_time(), client))

    async def _expire(self) -> None:
        """Close what has been idle too long (the oldest are first in each deque)."""
        limit = trio.current_time() - IDLE_MAX
        for kept in self._idle.values():
            while kept and kept[0][0] < limit:
                await kept.popleft()[1].discard()

    async def aclose(self) -> None:
        """At shutdown: every kept connection is closed; later releases close theirs."""
        self.closed = True
        for kept in self._idle.values():
            while kept:
                await kept.pop()[1].discard()
