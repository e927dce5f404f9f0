"""A scripted milter on a real loopback socket, written from the protocol spec.

It deliberately does not use trio_mta.milter, so a misreading of the protocol
on our side shows up as a failing test instead of agreeing with itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import trio


def pkt(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


@dataclass
class FakeMilter:
    """Answers each command byte from ``replies`` (default continue); at EOM
    sends ``eom_mods`` first. ``silent`` commands get no answer at all. SMFIC_QUIT_NC
    gets no answer and the next session follows on the same connection, unless
    ``close_on_quit_nc`` (a milter that does not keep connections) closes it."""

    replies: dict[bytes, bytes] = field(default_factory=dict)
    eom_mods: list[bytes] = field(default_factory=list)
    protocol: int = 0
    silent: set[bytes] = field(default_factory=set)
    received: list[tuple[bytes, bytes]] = field(default_factory=list)
    port: int = 0
    close_on_quit_nc: bool = False
    close_on_reused_connect: bool = False  # the race: closes when the next session begins
    connections: int = 0
    open_connections: int = 0

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [
            tuple(d.split(b"\0")[:2])
            for c, d in self.received  # type: ignore[misc]
            if c == b"L"
        ]

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.open_connections += 1
        try:
            await self._converse(stream)
        finally:
            self.open_connections -= 1

    async def _converse(self, stream: trio.SocketStream) -> None:
        buf = b""
        quit_nc = False
        async with stream:
            while True:
                while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
                    got = await stream.receive_some(65536)
                    if not got:
                        return
                    buf += got
                (n,) = struct.unpack(">I", buf[:4])
                command, data, buf = buf[4:5], buf[5 : 4 + n], buf[4 + n :]
                self.received.append((command, data))
                if command == b"O":
                    await stream.send_all(pkt(b"O", struct.pack(">III", 6, 0x1FF, self.protocol)))
                    continue
                if command in (b"D", b"A"):
                    continue
                if command == b"Q":
                    return
                if command == b"K":
                    if self.close_on_quit_nc:
                        return
                    quit_nc = True
                    continue
                if command == b"C" and quit_nc and self.close_on_reused_connect:
                    return
                if command in self.silent:
                    await trio.sleep_forever()
                if command == b"E":
                    for mod in self.eom_mods:
                        await stream.send_all(mod)
                reply = self.replies.get(command, b"c")
                await stream.send_all(pkt(reply[:1], reply[1:]))
