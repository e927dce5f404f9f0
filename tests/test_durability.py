"""A message that got 250 is never lost: SIGKILL under load, restart, count (SPEC §5).

Some senders send large messages, whose bodies are spooled to files while they
arrive: those must survive whole too, and a kill mid-DATA leaves no spool file.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import trio

from .proc import ServerProcess
from .rawsmtp import RawClient

CONFIG = """
hostname = "mx.durable.test"
state_dir = "state"
[[listen]]
address = "127.0.0.1:0"
mode = "smtp"
[local]
domains = ["durable.test"]
[queue]
retry_initial = "1s"
[server]
workers = {workers}
"""
SEQ = re.compile(rb"X-Seq: (\d+)")
LARGE = b"".join(b"%05d " % i + b"L" * 72 + b"\r\n" for i in range(4000))  # ~310 KiB, spooled
SMALL = b"x" * 500 + b"\r\n"


async def _sender(port: int, worker: int, acked: set[int], stop: trio.Event) -> None:
    body = LARGE if worker % 4 == 0 else SMALL
    n = 0
    while not stop.is_set():
        seq = worker * 100000 + n
        n += 1
        try:
            client = await RawClient.connect("127.0.0.1", port)
            await client.reply()
            await client.send(b"EHLO load.test\r\n")
            await client.reply()
            await client.send(
                b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<box%d@durable.test>\r\nDATA\r\n" % (seq % 7)
            )
            for _ in range(3):
                await client.reply()
            await client.send(
                b"Subject: load\r\nX-Seq: %d\r\n\r\n%sEND %d\r\n.\r\n" % (seq, body, seq)
            )
            if (await client.reply()).startswith(b"250"):
                acked.add(seq)
            await client.aclose()
        except (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError):
            return


def _delivered(root: Path) -> set[int]:
    """Sequence numbers of complete messages in the Maildirs; a truncated one fails."""
    found: set[int] = set()
    for path in root.glob("*/new/*"):
        data = path.read_bytes()
        match = SEQ.search(data)
        if match:
            seq = int(match.group(1))
            body = LARGE if (seq // 100000) % 4 == 0 else SMALL
            assert data.endswith(b"\n\n" + body.replace(b"\r\n", b"\n") + b"END %d\n" % seq), (
                f"truncated: {path}"
            )
            found.add(seq)
    return found


async def _wait_delivered(acked: set[int], root: Path) -> None:
    with trio.move_on_after(40):
        while not acked <= _delivered(root):
            await trio.sleep(0.2)


@pytest.mark.slow
async def test_sigkill_under_load_loses_nothing(tmp_path: Path) -> None:
    config = tmp_path / "mta.toml"
    config.write_text(CONFIG.format(workers=1))  # the one-process path; workers below
    server = ServerProcess.start(config)
    acked: set[int] = set()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for worker in range(16):
            nursery.start_soon(_sender, server.ports["smtp"], worker, acked, stop)
        await trio.sleep(2.0)
        server.kill()  # SIGKILL in the middle of everything
        stop.set()
    assert len(acked) > 50, "the load generator should have had many messages accepted"
    assert any((seq // 100000) % 4 == 0 for seq in acked), "some large messages got 250"
    root = tmp_path / "state" / "mail"
    restarted = ServerProcess.start(config)
    try:
        await _wait_delivered(acked, root)
    finally:
        assert restarted.stop(signal.SIGTERM) == 0
    missing = acked - _delivered(root)
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:10]}"
    spool = tmp_path / "state" / "spool"
    assert list(spool.iterdir()) == [], "the restart cleared what the kill left half-written"


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["worker", "parent", "every process"])
async def test_sigkill_with_workers_loses_nothing(tmp_path: Path, victim: str) -> None:
    """SPEC §12: the guarantee holds for each process, whichever of them dies."""
    config = tmp_path / "mta.toml"
    config.write_text(CONFIG.format(workers=2))
    server = ServerProcess.start(config)
    pids = server.worker_pids()
    assert len(pids) == 2
    acked: set[int] = set()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for worker in range(16):
            nursery.start_soon(_sender, server.ports["smtp"], worker, acked, stop)
        await trio.sleep(2.5)
        if victim == "worker":
            os.kill(pids[1], signal.SIGKILL)  # the parent restarts it
            await trio.sleep(1.0)  # keep the load on while it does
        else:
            targets = [server.proc.pid] + (list(pids.values()) if victim != "parent" else [])
            for pid in targets:
                os.kill(pid, signal.SIGKILL)
        stop.set()
    assert len(acked) > 50, "the load generator should have had many messages accepted"
    root = tmp_path / "state" / "mail"
    if victim == "worker":
        assert server.wait_for_log("worker.died worker=1 status=SIGKILL")
        restarted = server
    else:
        server.proc.wait()
        restarted = ServerProcess.start(config, timeout=60)
    try:
        await _wait_delivered(acked, root)
    finally:
        assert restarted.stop(signal.SIGTERM) == 0
    missing = acked - _delivered(root)
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:10]}"
