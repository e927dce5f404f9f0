"""A scripted SMTP client over a real socket, for byte-exact conversations."""

from __future__ import annotations

import re
import ssl

import trio

_LAST_LINE = re.compile(rb"^\d{3}(?: [^\r\n]*)?\r\n", re.MULTILINE)


class RawClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream(host, port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self, timeout: float = 10) -> bytes:
        """One complete (possibly multi-line) reply, CRLFs included."""
        with trio.fail_after(timeout):
            while True:
                match = _LAST_LINE.search(self.buffer)
                if match:
                    end = match.end()
                    out, self.buffer = self.buffer[:end], self.buffer[end:]
                    return out
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError(f"connection closed; pending {self.buffer!r}")
                self.buffer += chunk

    async def code(self, timeout: float = 10) -> int:
        return int((await self.reply(timeout))[:3])

    async def command(self, line: bytes) -> bytes:
        await self.send(line + b"\r\n")
        return await self.reply()

    async def eof(self, timeout: float = 10) -> bool:
        """True when the server closed the connection (after any pending bytes)."""
        with trio.fail_after(timeout):
            while True:
                try:
                    chunk = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return True
                if not chunk:
                    return True
                self.buffer += chunk

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        tls = trio.SSLStream(self.stream, context, server_hostname=server_hostname)
        await tls.do_handshake()
        self.stream = tls

    async def aclose(self) -> None:
        await self.stream.aclose()
