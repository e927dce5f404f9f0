"""A message that got 250 is never lost: SIGKILL under load, restart, count (SPEC §5)."""

from __future__ import annotations

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
"""
SEQ = re.compile(rb"X-Seq: (\d+)")


async def _sender(port: int, worker: int, acked: set[int], stop: trio.Event) -> None:
    n = 0
    while not stop.is_set():
        seq = worker * 100000 + n
        n += 1
        try:
            client = await RawClient.connect("127.0.0.1", port)
            await client.reply()
            await client.send(b"EHLO load.test\r\n")
            await client.reply()
            await client.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<box%d@durable.test>\r\n"
                              b"DATA\r\n" % (seq % 7))
            for _ in range(3):
                await client.reply()
            await client.send(b"Subject: load\r\nX-Seq: %d\r\n\r\n%s\r\n.\r\n"
                              % (seq, b"x" * 500))
            if (await client.reply()).startswith(b"250"):
                acked.add(seq)
            await client.aclose()
        except (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError):
            return


def _delivered(root: Path) -> set[int]:
    found: set[int] = set()
    for path in root.glob("*/new/*"):
        match = SEQ.search(path.read_bytes())
        if match:
            found.add(int(match.group(1)))
    return found


@pytest.mark.slow
async def test_sigkill_under_load_loses_nothing(tmp_path: Path) -> None:
    config = tmp_path / "mta.toml"
    config.write_text(CONFIG)
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
    root = tmp_path / "state" / "mail"
    restarted = ServerProcess.start(config)
    try:
        with trio.move_on_after(30):
            while not acked <= _delivered(root):
                await trio.sleep(0.2)
    finally:
        assert restarted.stop(signal.SIGTERM) == 0
    missing = acked - _delivered(root)
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:10]}"
