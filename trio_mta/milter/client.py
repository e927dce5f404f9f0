"""One connection to one milter: the trio glue around the sans-IO ``Milter``.

Every wait for the milter is bounded by its ``timeout`` (restarted by a
SMFIR_PROGRESS); anything that goes wrong (refused connection, timeout,
closed socket, protocol error) comes out as :class:`MilterUnavailable`, which
the chain turns into the milter's ``on_error`` policy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import trio

from trio_mta.milter.protocol import CONTINUE, Milter, MilterProtocolError, Progress, Verdict
from trio_mta.socket_stream import connect_ip, is_ip_literal

RECEIVE_SIZE = 65536


@dataclass(frozen=True)
class MilterSpec:
    """A ``[[milter]]`` table: ``address`` is ``host:port`` or ``unix:/path``."""

    address: str
    timeout: float = 30.0
    on_error: str = "tempfail"  # tempfail | accept
    reuse_connections: bool = False  # end sessions with SMFIC_QUIT_NC and keep the socket


class MilterUnavailable(Exception):
    """The milter cannot be used for the rest of this session."""


def split_address(address: str) -> tuple[str, int] | str:
    """``(host, port)`` for TCP, the socket path for ``unix:``."""
    if address.startswith("unix:"):
        return address[5:]
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class MilterClient:
    def __init__(self, spec: MilterSpec) -> None:
        self.spec = spec
        self._target = split_address(spec.address)
        # A milter is connected to once per SMTP session: for an IP literal (the
        # usual 127.0.0.1:11332) a direct connect skips the resolver and trio's
        # happy-eyeballs machinery, which cost more CPU than the milter exchange.
        self._literal = not isinstance(self._target, str) and is_ip_literal(self._target[0])
        self.proto = Milter()
        self.stream: trio.abc.Stream | None = None
        # Packets that get no answer (NR_* stages, macros, ABORT) wait here and go out
        # with the next packet that does: a message is a few writes, not one per header.
        self._pending: list[bytes] = []
        self.kept = False  # handed out again by the pool: its milter may have just closed it

    async def open(self) -> None:
        """Connect and negotiate; a kept connection (milter/pool.py) is ready already."""
        if self.stream is not None:
            return
        target = self._target
        try:
            with trio.fail_after(self.spec.timeout):
                if isinstance(target, str):
                    self.stream = await trio.open_unix_socket(target)
                elif self._literal:
                    self.stream = await connect_ip(*target)
                else:
                    self.stream = await trio.open_tcp_stream(*target)
        except (OSError, trio.TooSlowError) as exc:
            raise MilterUnavailable(f"cannot connect: {exc or 'timeout'}") from exc
        await self.exchange(self.proto.optneg())

    async def exchange(self, data: bytes) -> Verdict:
        """Send ``data``; when the stage wants an answer, wait for its verdict."""
        stream = self.stream
        if stream is None:
            raise MilterUnavailable("not connected")
        if self.proto.awaiting is None:
            if data:
                self._pending.append(data)
            return CONTINUE
        try:
            self._pending.append(data)
            out = b"".join(self._pending)
            self._pending = []
            # One deadline for the send and the answer, moved on by each SMFIR_PROGRESS.
            with trio.fail_after(self.spec.timeout) as scope:
                await stream.send_all(out)
                while True:
                    event = self.proto.next_event()
                    while event is None:
                        got = await stream.receive_some(RECEIVE_SIZE)
                        if not got:
                            raise MilterUnavailable("milter closed the connection")
                        self.proto.receive_data(bytes(got))
                        event = self.proto.next_event()
                    if not isinstance(event, Progress):
                        return event
                    scope.deadline = trio.current_time() + self.spec.timeout
        except trio.TooSlowError as exc:
            raise MilterUnavailable(f"no answer within {self.spec.timeout:g}s") from exc
        except MilterProtocolError as exc:
            raise MilterUnavailable(f"protocol error: {exc}") from exc
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise MilterUnavailable(f"connection lost: {exc or type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._end(self.proto.quit())

    async def discard(self) -> None:
        """Close the socket without a word: it is stale or the conversation is broken."""
        await self._end(b"")

    async def _end(self, last: bytes) -> None:
        stream, self.stream = self.stream, None
        if stream is None:
            return
        # Shielded: a session cancelled at shutdown still says QUIT and closes the socket.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
            if last:
                with contextlib.suppress(
                    OSError, trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    await stream.send_all(b"".join(self._pending) + last)
            await stream.aclose()
        self._pending = []

    async def quit_for_reuse(self) -> bool:
        """SMFIC_QUIT_NC, when the conversation is at a clean point (no answer owed, nothing
        unread): the milter resets to just after negotiation. False: close it instead."""
        stream = self.stream
        if stream is None or not self.proto.idle:
            return False
        try:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1) as scope:
                await stream.send_all(b"".join(self._pending) + self.proto.quit_nc())
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._pending = []
        return not scope.cancelled_caught
