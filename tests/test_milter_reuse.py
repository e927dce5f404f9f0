"""Milter connections kept between SMTP sessions (``reuse_connections``, milter/pool.py).

The scripted milter counts its connections and records SMFIC_QUIT_NC; smtplib
plays the clients; every message must still be filtered and delivered, and a
kept connection that went stale must never cost a client a 451.
"""

from __future__ import annotations

import os
import resource
import smtplib
from collections.abc import Callable

import pytest
import trio

import trio_mta
from trio_mta.config import Config
from trio_mta.milter import pool as milter_pool
from trio_mta.milter.client import MilterSpec
from trio_mta.milter.pool import MilterPool

from .fakemilter import FakeMilter
from .maildirs import new_files, wait_for_mail
from .test_milter import MESSAGE, _run, _send, _start


async def _reusing(
    nursery: trio.Nursery, fake: FakeMilter, reuse: bool = True
) -> dict[str, object]:
    port = await nursery.start(fake.serve)
    return {"address": f"127.0.0.1:{port}", "timeout": "2s", "reuse_connections": reuse}


def _commands(fake: FakeMilter) -> list[bytes]:
    return [command for command, _ in fake.received]


async def _until(condition: Callable[[], bool]) -> None:
    """A session's milter connection is handed back after its client has gone: wait for
    that before the next client connects, or it would (rightly) get a connection of its own."""
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.02)


async def _sessions(
    mta: trio_mta.MTA, fake: FakeMilter, count: int, code: int = 250, *, closed: bool = False
) -> None:
    """``count`` SMTP sessions one after the other, each answered ``code`` at its end and
    handed back (QUIT_NC seen; with ``closed``, the milter has also dropped it)."""
    for n in range(count):
        assert (await _run(lambda: _send(mta.address("smtp")[1])))[-1][0] == code
        await _until(
            lambda n=n: (
                _commands(fake).count(b"K") == n + 1 and not (closed and fake.open_connections)
            )
        )


async def test_sessions_share_one_negotiated_connection(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    fake = FakeMilter()
    mta = await _start(nursery, make_config, await _reusing(nursery, fake))
    await _sessions(mta, fake, 3)
    await wait_for_mail(mta.config.local.maildir_root, "bob", count=3)
    commands = _commands(fake)
    assert fake.connections == 1
    assert commands.count(b"O") == 1  # negotiated once
    assert commands.count(b"C") == 3 and commands.count(b"E") == 3  # every session filtered
    assert commands.count(b"K") == 3 and b"Q" not in commands
    # Each later session starts right after the QUIT_NC that ended the one before.
    assert [commands[i + 1] for i, c in enumerate(commands[:-1]) if c == b"K"][:2] == [b"D"] * 2


async def test_without_reuse_every_session_connects_and_quits(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    fake = FakeMilter()
    mta = await _start(nursery, make_config, await _reusing(nursery, fake, reuse=False))
    for _ in range(2):
        assert (await _run(lambda: _send(mta.address("smtp")[1])))[-1][0] == 250
    await wait_for_mail(mta.config.local.maildir_root, "bob", count=2)
    await _until(lambda: _commands(fake).count(b"Q") == 2)
    assert fake.connections == 2 and b"K" not in _commands(fake)


async def test_a_milter_that_closes_kept_connections_costs_no_client_anything(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    """The kept socket is found closed when the next session wants it: a new one is opened."""
    fake = FakeMilter(close_on_quit_nc=True)
    mta = await _start(nursery, make_config, await _reusing(nursery, fake))
    await _sessions(mta, fake, 3, closed=True)
    await wait_for_mail(mta.config.local.maildir_root, "bob", count=3)
    assert fake.connections == 3
    assert _commands(fake).count(b"E") == 3


async def test_a_kept_connection_closed_as_the_session_begins_is_replaced(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    """The milter closes the kept socket just as it gets the next CONNECT (after our
    check found it fit): that session reconnects and its client still gets 250."""
    fake = FakeMilter(close_on_reused_connect=True)
    mta = await _start(nursery, make_config, await _reusing(nursery, fake))
    await _sessions(mta, fake, 2)
    await wait_for_mail(mta.config.local.maildir_root, "bob", count=2)
    assert fake.connections == 2
    assert _commands(fake).count(b"E") == 2


async def test_a_transaction_left_open_is_aborted_before_the_connection_is_kept(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    fake = FakeMilter()
    mta = await _start(nursery, make_config, await _reusing(nursery, fake))
    port = mta.address("smtp")[1]

    def leave_after_rcpt() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.ehlo("c.test")
            assert client.mail("s@remote.test")[0] == 250
            assert client.rcpt("bob@example.test")[0] == 250

    await trio.to_thread.run_sync(leave_after_rcpt)
    await _until(lambda: b"K" in _commands(fake))
    assert (await _run(lambda: _send(port)))[-1][0] == 250
    [path] = await wait_for_mail(mta.config.local.maildir_root, "bob")
    assert path.read_bytes().endswith(MESSAGE.replace(b"\r\n", b"\n"))
    commands = _commands(fake)
    first_k = commands.index(b"K")
    assert commands[first_k - 1] == b"A"  # the open transaction was aborted first
    assert fake.connections == 1


async def test_a_refusing_milter_keeps_refusing_on_a_kept_connection(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    fake = FakeMilter(replies={b"E": b"r"})
    mta = await _start(nursery, make_config, await _reusing(nursery, fake))
    await _sessions(mta, fake, 2, 550)
    assert fake.connections == 1
    await trio.sleep(0.3)
    assert new_files(mta.config.local.maildir_root, "bob") == []


async def test_a_connection_idle_too_long_is_closed_not_reused(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(milter_pool, "IDLE_MAX", 0.3)
    fake = FakeMilter()
    port = await nursery.start(fake.serve)
    spec = MilterSpec(f"127.0.0.1:{port}", 2.0, "tempfail", True)
    pool = MilterPool()
    client = await pool.acquire(spec)
    await client.open()
    await pool.release(client)
    assert await pool.acquire(spec) is client  # fresh: given out again
    await pool.release(client)
    await trio.sleep(0.5)
    other = await pool.acquire(spec)
    assert other is not client and client.stream is None  # the stale one was closed
    await other.open()
    await pool.release(other)
    await pool.aclose()
    assert other.stream is None
    assert fake.connections == 2


async def test_a_kept_connection_past_fd_setsize_is_still_reused(nursery: trio.Nursery) -> None:
    """A busy MX holds thousands of sockets: a milter socket numbered past 1024 (where
    select() gives up) must still be judged fit, or reuse silently stops."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"only {hard} file descriptors allowed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fake = FakeMilter()
    port = await nursery.start(fake.serve)
    spec = MilterSpec(f"127.0.0.1:{port}", 2.0, "tempfail", True)
    pool = MilterPool()
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        client = await pool.acquire(spec)
        await client.open()
        assert client.stream is not None and client.stream.socket.fileno() > 1024  # type: ignore[attr-defined]
        await pool.release(client)
        assert await pool.acquire(spec) is client
        await pool.release(client)
        await pool.aclose()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert fake.connections == 1


async def test_shutdown_closes_kept_connections(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    fake = FakeMilter()
    milter = await _reusing(nursery, fake)
    async with trio.open_nursery() as inner:
        mta: trio_mta.MTA = await inner.start(
            lambda task_status: trio_mta.serve(
                make_config(milter=[milter]), task_status=task_status
            )
        )
        assert (await _run(lambda: _send(mta.address("smtp")[1])))[-1][0] == 250
        await _until(lambda: b"K" in _commands(fake))
        assert fake.open_connections == 1  # kept while the server runs
        mta.stop()
    assert fake.connections == 1
    await _until(lambda: fake.open_connections == 0)
