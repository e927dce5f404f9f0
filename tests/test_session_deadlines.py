"""Every wait of a session is bounded: a client that stops reading is dropped.

The client's receive buffer is made small and it pipelines far more replies
than the kernel buffers hold, then never reads: the server's flush blocks and
must run out of command_timeout the way a read does.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from trio_mta.config import Config
from trio_mta.mta import MTA, serve
from trio_mta.server.passwords import PasswordFile

# Enough EHLO replies (~250 bytes each) to overflow the server's send buffer
# (autotuned up to 4 MiB) and the client's small receive buffer.
FLOOD = b"EHLO c.test\r\n" * 40000


async def _stalled_client(
    port: int, prologue: bytes, tls: ssl.SSLContext | None = None
) -> trio.abc.Stream:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream: trio.abc.Stream = trio.SocketStream(sock)
    if tls is not None:
        stream = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
    # Once the server blocks writing it stops reading too, so the tail of the
    # flood may never leave the client: give up sending after a while.
    with trio.move_on_after(5):
        # BrokenResourceError: the server gave up on us (what the tests want) first.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(prologue + FLOOD)
    return stream


async def _dropped(server: MTA, within: float) -> bool:
    with trio.move_on_after(within):
        while server.state.sessions:
            await trio.sleep(0.1)
        return True
    return False


async def _server(nursery: trio.Nursery, config: Config) -> MTA:
    server: MTA = await nursery.start(serve, config)
    return server


async def test_client_that_stops_reading_after_data_is_dropped(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    server = await _server(nursery, make_config(limits={"command_timeout": 1}))
    sock = await _stalled_client(
        server.address("smtp")[1],
        (
            b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n"
            b"Subject: p\r\n\r\nbody\r\n.\r\n"
        ),
    )
    async with sock:
        assert await _dropped(server, within=8), "session pinned by a blocked flush"


async def test_client_that_stops_reading_after_auth_is_dropped(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    tmp_path: Path,
    tls_files: tuple[Path, Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    users = tmp_path / "users"
    PasswordFile(users).set_password("alice", "secret")
    server = await _server(
        nursery, make_config(limits={"command_timeout": 1}, auth={"users_file": str(users)})
    )
    client_ctx = ssl.create_default_context(cafile=str(tls_files[2]))
    token = base64.b64encode(b"\0alice\0secret")
    stream = await _stalled_client(
        server.address("smtps")[1], b"EHLO c.test\r\nAUTH PLAIN " + token + b"\r\n", client_ctx
    )
    async with stream:
        assert await _dropped(server, within=8), "session pinned by a blocked flush"
    events = [record.getMessage() for record in caplog.records]
    assert "smtpd.timeout" in events
    # The 421 cannot be written into a TLS stream broken by the cancelled write:
    # that is the end of the session, not a session error.
    assert "smtpd.session_error" not in events
