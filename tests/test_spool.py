"""Large bodies go to spool files as they arrive (defect 5): bounded memory, no leftovers."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import trio

from trio_mta.config import Config
from trio_mta.mta import MTA, serve

from .maildirs import new_files, wait_for_mail
from .proc import ServerProcess
from .rawsmtp import RawClient

MiB = 1 << 20
SESSIONS = 40
SIZE = 8 * MiB
LINE = b"x" * 78 + b"\r\n"
PIECE = LINE * 820  # ~64 KiB

CONFIG = """
hostname = "mx.spool.test"
state_dir = "state"
[[listen]]
address = "127.0.0.1:0"
mode = "smtp"
[local]
domains = ["spool.test"]
[limits]
max_connections_per_ip = 100
[server]
workers = 1  # one process takes every session: its memory is what is measured
"""


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


async def _open_transaction(port: int, n: int) -> RawClient:
    client = await RawClient.connect("127.0.0.1", port)
    await client.reply()
    await client.command(b"EHLO big.test")
    assert (await client.command(b"MAIL FROM:<a@remote.test>")).startswith(b"250")
    assert (await client.command(b"RCPT TO:<box%d@spool.test>" % (n % 4))).startswith(b"250")
    assert (await client.command(b"DATA")).startswith(b"354")
    await client.send(b"Subject: big %d\r\nX-Big: %d\r\n\r\n" % (n, n))
    return client


async def test_concurrent_large_messages_keep_server_memory_bounded(tmp_path: Path) -> None:
    config = tmp_path / "mta.toml"
    config.write_text(CONFIG)
    server = ServerProcess.start(config)
    pid = server.proc.pid
    port = server.ports["smtp"]
    root = tmp_path / "state" / "mail"
    try:
        # Warm up (imports, first commit, first delivery) before the baseline.
        warm = await _open_transaction(port, 0)
        assert (await warm.command(b"warm\r\n.")).startswith(b"250")
        await warm.aclose()
        await wait_for_mail(root, "box0")
        baseline = _status(pid)["VmRSS"]

        clients: list[RawClient] = []
        for n in range(SESSIONS):
            clients.append(await _open_transaction(port, n))

        async def body(client: RawClient) -> None:
            for _ in range(SIZE // len(PIECE)):
                await client.send(PIECE)

        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(body, client)
        await trio.sleep(0.5)  # let the server take in what is in flight
        # Every body is complete on the server's side but not ended: all are held now.
        during = _status(pid)["VmRSS"]
        spooled = list((tmp_path / "state" / "spool").iterdir())
        assert len(spooled) == SESSIONS, "each body in progress has its spool file"

        replies: list[bytes] = []

        async def end(client: RawClient) -> None:
            replies.append(await client.command(b"."))
            await client.command(b"QUIT")
            await client.aclose()

        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(end, client)
        assert all(r.startswith(b"250") for r in replies), replies
        with trio.fail_after(120):
            while sum(len(new_files(root, f"box{i}")) for i in range(4)) < SESSIONS + 1:
                await trio.sleep(0.2)
        await trio.sleep(0.5)
        after = _status(pid)
    finally:
        assert server.stop() == 0
    total = SESSIONS * SIZE
    print(
        f"baseline {baseline / MiB:.0f} MiB, holding {(during - baseline) / MiB:.0f} MiB,"
        f" peak {(after['VmHWM'] - baseline) / MiB:.0f} MiB, after"
        f" {(after['VmRSS'] - baseline) / MiB:.0f} MiB over the baseline"
    )
    growth = during - baseline
    peak = after["VmHWM"] - baseline
    assert growth < total / 8, f"RSS grew {growth / MiB:.0f} MiB holding {total / MiB:.0f} MiB"
    assert peak < total / 6, f"peak RSS {peak / MiB:.0f} MiB over the baseline"
    assert after["VmRSS"] - baseline < total / 8, "memory came back after the connections"
    sizes = [p.stat().st_size for i in range(4) for p in new_files(root, f"box{i}")]
    big = [size for size in sizes if size > MiB]
    assert len(big) == SESSIONS
    # LF line ends in Maildir: each 80-byte line lost its CR; the headers differ by a digit.
    sent = SIZE // len(PIECE) * len(PIECE) * 79 // 80
    assert all(sent < size < sent + 1024 for size in big), big
    assert list((tmp_path / "state" / "spool").iterdir()) == []


async def _big_transaction(
    mta: MTA, rcpt: bytes = b"bob@example.test", size: int = 4 * 64 * 1024
) -> RawClient:
    client = await RawClient.connect(*mta.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"MAIL FROM:<a@remote.test>")
    assert (await client.command(b"RCPT TO:<" + rcpt + b">")).startswith(b"250")
    return client


def _spool(mta: MTA) -> list[Path]:
    folder = mta.config.state_dir / "spool"
    return sorted(folder.iterdir()) if folder.exists() else []


async def _wait_spooled(mta: MTA) -> None:
    with trio.fail_after(10):
        while not _spool(mta):
            await trio.sleep(0.02)


async def _wait_unspooled(mta: MTA) -> None:
    with trio.move_on_after(10):
        while _spool(mta):
            await trio.sleep(0.02)
    assert _spool(mta) == []


async def test_client_vanishing_mid_data_leaves_no_spool_file(mta: MTA) -> None:
    client = await _big_transaction(mta)
    assert (await client.command(b"DATA")).startswith(b"354")
    await client.send(b"Subject: big\r\n\r\n" + PIECE * 4)
    await _wait_spooled(mta)
    await client.aclose()
    await _wait_unspooled(mta)


async def test_rset_after_bdat_chunk_leaves_no_spool_file(mta: MTA) -> None:
    client = await _big_transaction(mta)
    chunk = b"Subject: big\r\n\r\n" + PIECE * 4
    await client.send(b"BDAT %d\r\n" % len(chunk) + chunk)
    assert (await client.reply()).startswith(b"250")
    await _wait_spooled(mta)
    assert (await client.command(b"RSET")).startswith(b"250")
    await _wait_unspooled(mta)
    # The session goes on: a small message still passes.
    await client.command(b"MAIL FROM:<a@remote.test>")
    await client.command(b"RCPT TO:<bob@example.test>")
    await client.send(b"BDAT 12 LAST\r\nSubject: x\r\n")
    assert (await client.reply()).startswith(b"250")
    await wait_for_mail(mta.config.local.maildir_root, "bob")


async def test_bare_lf_in_large_message_leaves_no_spool_file(mta: MTA) -> None:
    client = await _big_transaction(mta)
    assert (await client.command(b"DATA")).startswith(b"354")
    await client.send(b"Subject: big\r\n\r\n" + PIECE * 4)
    await _wait_spooled(mta)
    reply = await client.command(b"bare\nline\r\n.")
    assert reply.startswith(b"5"), reply
    await _wait_unspooled(mta)


async def test_oversized_message_leaves_no_spool_file(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    server: MTA = await nursery.start(serve, make_config(limits={"max_message_size": 200_000}))
    client = await _big_transaction(server)
    assert (await client.command(b"DATA")).startswith(b"354")
    await client.send(b"Subject: big\r\n\r\n" + PIECE * 2)
    await _wait_spooled(server)
    await client.send(PIECE * 4)
    assert (await client.command(b".")).startswith(b"552")
    await _wait_unspooled(server)
    assert new_files(server.config.local.maildir_root, "bob") == []


async def test_large_message_is_delivered_whole(mta: MTA) -> None:
    client = await _big_transaction(mta)
    assert (await client.command(b"DATA")).startswith(b"354")
    body = b"".join(b"line %06d " % i + b"y" * 60 + b"\r\n" for i in range(20000))
    await client.send(b"Subject: whole\r\n\r\n" + body)
    reply = await client.command(b".")
    assert reply.startswith(b"250"), reply
    [path] = await wait_for_mail(mta.config.local.maildir_root, "bob")
    content = path.read_bytes()
    assert content.endswith(body.replace(b"\r\n", b"\n"))
    assert b"\r" not in content
    assert b"\nReceived: from c.test" in content
    bodies = mta.config.state_dir / "bodies"
    with trio.move_on_after(5):  # delivered: the body file goes after the next commit
        while any(p.is_file() for p in bodies.rglob("*")):
            client = await _big_transaction(mta, b"carol@example.test")
            await client.command(b"DATA")
            await client.command(b"small\r\n.")
            await trio.sleep(0.2)
    assert not any(p.is_file() for p in bodies.rglob("*"))
    assert os.listdir(mta.config.state_dir / "spool") == []
