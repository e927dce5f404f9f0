"""The accept loop: capacity errors pause it, anything else stops the server loudly."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import stat
from collections.abc import Callable, Iterator

import pytest
import trio

from trio_mta.config import Config
from trio_mta.mta import MTA, ListenError, serve

from .rawsmtp import RawClient


def _listening_socket(port: int) -> socket.socket:
    """A duplicate of this process's listening socket on ``port`` (shutdown reaches it)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
            if (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                and sock.getsockname()[1] == port
            ):
                return sock
            sock.close()
    raise AssertionError(f"no listening socket on port {port}")


@contextlib.contextmanager
def _no_free_descriptors() -> Iterator[None]:
    """Make every new file descriptor of this process fail with EMFILE, for a moment."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_accept_out_of_descriptors_pauses_then_resumes(
    nursery: trio.Nursery, make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    server: MTA = await nursery.start(serve, make_config())
    host, port = server.address("smtp")
    waiting = [trio.socket.socket() for _ in range(3)]
    with _no_free_descriptors():
        for sock in waiting:
            await sock.connect((host, port))  # the kernel completes it; accept cannot
        await trio.sleep(0.6)  # several pauses of 0.1 s
    where = f"{host}:{port} (smtp)"
    paused = [
        r
        for r in caplog.records
        if r.getMessage() == "smtpd.accept_paused"
        and getattr(r, "trio_mta_fields", {}).get("listener") == where
    ]
    assert len(paused) == 1, "one line when accepting pauses, not one per retry"
    for sock in waiting:
        client = RawClient(trio.SocketStream(sock))
        assert (await client.reply()).startswith(b"220 "), "accepting resumed"
        await client.aclose()
    assert any(
        r.getMessage() == "smtpd.accept_resumed"
        and getattr(r, "trio_mta_fields", {}).get("listener") == where
        for r in caplog.records
    )


async def test_accept_error_other_than_capacity_stops_the_server(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(listen=[{"address": "127.0.0.1:0", "mode": "smtp"}])
    with trio.fail_after(10), pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            server: MTA = await nursery.start(serve, config)
            with _listening_socket(server.address("smtp")[1]) as sock:
                sock.shutdown(socket.SHUT_RDWR)  # accept(2) now fails with EINVAL
    error = caught.value
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    assert isinstance(error, ListenError), repr(error)
    assert str(error).startswith("accepting on 127.0.0.1:")
    assert str(error).endswith("(smtp) failed: Invalid argument")
