"""A trio stream over a non-blocking socket that tries the system call first.

``trio.SocketStream`` makes every ``send_all`` and ``receive_some`` two full
checkpoints (a cancellation check before the call, a reschedule after it) plus
a conflict detector, whether or not the socket was ready. An SMTP session that
does not pipeline makes a dozen such calls per message, and on loopback the
socket is almost always ready: measured with ``smtp-source`` against a minimal
responder, that bookkeeping was about 0.5 ms of CPU per message, more than the
protocol work itself.

:class:`DirectSocketStream` calls ``send``/``recv`` at once and waits in
``trio.lowlevel.wait_writable``/``wait_readable`` (cancellable, like any trio
wait) only when the kernel says ``EAGAIN``. So that a peer that always has data
ready can neither starve the other tasks nor outrun a cancel scope's deadline,
every :data:`CHECKPOINT_EVERY`-th call that did not block is a real checkpoint.
One task per stream (the session) is assumed, as in the server; concurrent
calls are not detected.

:func:`connect_ip` opens such a stream to an IP literal, for peers a session
connects to once per connection (a milter): ``trio.open_tcp_stream`` would
call the resolver and run a happy-eyeballs nursery for the one address there is.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from typing import Final

import trio

__all__ = ["CHECKPOINT_EVERY", "DirectSocketStream", "connect_ip", "is_ip_literal"]

CHECKPOINT_EVERY: Final = 8


class DirectSocketStream(trio.abc.HalfCloseableStream):
    """``trio.abc.HalfCloseableStream`` over a stdlib socket (made non-blocking here)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # not TCP (a socketpair in tests): nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self._ready_calls = 0
        self._closed = False

    async def _maybe_checkpoint(self) -> None:
        self._ready_calls += 1
        if self._ready_calls >= CHECKPOINT_EVERY:
            self._ready_calls = 0
            await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        view = memoryview(data)
        blocked = False
        while view:
            try:
                sent = self.socket.send(view)
            except BlockingIOError:
                blocked = True
                await self._wait_writable()
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            view = view[sent:]
        if blocked:
            self._ready_calls = 0  # the wait was a schedule point already
        else:
            await self._maybe_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await self._wait_writable()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        size = 65536 if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be at least 1")
        blocked = False
        while True:
            try:
                data = self.socket.recv(size)
            except BlockingIOError:
                blocked = True
                await self._wait_readable()
                continue
            except OSError as exc:
                if exc.errno == errno.ECONNRESET:
                    raise trio.BrokenResourceError("connection reset by peer") from exc
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
            if blocked:
                self._ready_calls = 0
            else:
                await self._maybe_checkpoint()
            return data

    async def send_eof(self) -> None:
        self._check_open()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise trio.BrokenResourceError(f"shutdown failed: {exc}") from exc
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()

    async def _wait_readable(self) -> None:
        try:
            await trio.lowlevel.wait_readable(self.socket)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the stream was closed while receiving") from None
        self._check_open()

    async def _wait_writable(self) -> None:
        try:
            await trio.lowlevel.wait_writable(self.socket)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the stream was closed while sending") from None
        self._check_open()


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def connect_ip(host: str, port: int) -> DirectSocketStream:
    """A connected :class:`DirectSocketStream` to ``host`` (an IPv4/IPv6 literal).

    Raises ``OSError`` as ``connect`` does; a cancelled wait closes the socket.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect((host, port))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error)) from None
        else:
            await trio.lowlevel.checkpoint()
    except BaseException:
        sock.close()
        raise
    return DirectSocketStream(sock)
