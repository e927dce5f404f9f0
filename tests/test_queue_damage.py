"""A damaged queue never stops all mail (defect 4): one bad message is set aside,
a damaged database is recovered, an unusable one is refused in one line."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import trio

from trio_mta.queue.bodies import BodyFiles, SpooledBody, crc_of
from trio_mta.queue.store import NewMessage, NewRecipient, QueueStore

from .maildirs import new_files
from .proc import ServerProcess, run_cli

CONFIG = """
hostname = "mx.damage.test"
state_dir = "state"
[[listen]]
address = "127.0.0.1:0"
mode = "smtp"
[local]
domains = ["damage.test"]
"""


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "mta.toml"
    config.write_text(CONFIG)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return config, state


def _message(n: int, size: int = 3000) -> bytes:
    marker = b"MARKER-%03d-" % n
    return b"Subject: m%d\r\nX-Seq: %d\r\n\r\n" % (n, n) + (marker * (size // len(marker)))


def _rcpt() -> tuple[NewRecipient, ...]:
    return (NewRecipient("box@damage.test", "box@damage.test", "box"),)


def _queue_inline(state: Path, count: int) -> list[str]:
    """Queue `count` small messages (inline bodies) while no server runs."""
    store = QueueStore(state / "queue.sqlite3")
    ids = [f"M{n:03d}" for n in range(count)]
    store.insert(
        [(mid, NewMessage("a@remote.test", _rcpt(), _message(n))) for n, mid in enumerate(ids)],
        now=1.0,
    )
    store.close()  # checkpoints the WAL into the database file
    return ids


def _queue_files(state: Path, count: int) -> list[str]:
    """Queue `count` large messages whose bodies are files, as the spool leaves them."""
    files = BodyFiles(state / "queue.sqlite3")
    files.ensure_spool()
    store = QueueStore(state / "queue.sqlite3")
    ids = [f"F{n:03d}" for n in range(count)]
    items = []
    for n, mid in enumerate(ids):
        body = _message(n, 200_000)
        spool = files.spool / mid
        spool.write_bytes(body)
        items.append(
            (
                mid,
                NewMessage(
                    "a@remote.test",
                    _rcpt(),
                    b"X-Trace: t\r\n",
                    spooled=SpooledBody(spool, len(body), crc_of(body)),
                ),
            )
        )
    store.insert(items, now=1.0)
    store.close()
    return ids


def _delivered(state: Path) -> set[int]:
    seqs = set()
    for path in new_files(state / "mail", "box"):
        for line in path.read_bytes().split(b"\n"):
            if line.startswith(b"X-Seq: "):
                seqs.add(int(line.split()[1]))
    return seqs


async def _wait_delivered(state: Path, want: int, timeout: float = 30) -> set[int]:
    with trio.move_on_after(timeout):
        while len(_delivered(state)) < want:
            await trio.sleep(0.1)
    return _delivered(state)


def _queue_list(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = run_cli("queue", "list", "--config", str(config), *extra)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def _one_line_refusal(result: subprocess.CompletedProcess[str], path: Path, what: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if str(path) in line]
    assert len(lines) == 1 and what in lines[0], result.stderr


async def test_damaged_inline_body_is_set_aside_and_the_rest_delivered(tmp_path: Path) -> None:
    config, state = _setup(tmp_path)
    ids = _queue_inline(state, 5)
    db = state / "queue.sqlite3"
    raw = bytearray(db.read_bytes())
    at = raw.index(b"MARKER-002-")
    raw[at + 100 : at + 120] = random.Random(2).randbytes(20)
    db.write_bytes(bytes(raw))
    server = ServerProcess.start(config)
    try:
        assert await _wait_delivered(state, 4) == {0, 1, 3, 4}
        assert server.wait_for_log("queue.damaged")
        assert server.proc.poll() is None, "the server keeps running"
        listed = json.loads(_queue_list(config, "--json").stdout)
        assert [row["id"] for row in listed] == [ids[2]]
        assert "checksum" in listed[0]["damaged"]
        assert "DAMAGED" in _queue_list(config).stdout
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert _delivered(state) == {0, 1, 3, 4}


async def test_damaged_body_file_is_set_aside_and_the_rest_delivered(tmp_path: Path) -> None:
    config, state = _setup(tmp_path)
    ids = _queue_files(state, 5)
    files = BodyFiles(state / "queue.sqlite3")
    with open(files.path_for(ids[1]), "r+b") as f:
        f.seek(5000)
        f.write(b"\x00garbage\x00")
    files.path_for(ids[3]).unlink()
    server = ServerProcess.start(config)
    try:
        assert await _wait_delivered(state, 3) == {0, 2, 4}
        listed = {row["id"]: row for row in json.loads(_queue_list(config, "--json").stdout)}
        assert sorted(listed) == [ids[1], ids[3]]
        assert "checksum" in listed[ids[1]]["damaged"]
        assert "missing" in listed[ids[3]]["damaged"]
        assert files.path_for(ids[1]).exists(), "a damaged body is kept, not deleted"
    finally:
        assert server.stop(signal.SIGTERM) == 0
    for path in new_files(state / "mail", "box"):
        assert path.read_bytes().endswith(
            _message(int(path.read_bytes().split(b"X-Seq: ")[1].split(b"\n")[0]), 200_000)[
                -1000:
            ].replace(b"\r\n", b"\n")
        )


async def test_random_bytes_in_database_pages_do_not_stop_delivery(tmp_path: Path) -> None:
    config, state = _setup(tmp_path)
    _queue_inline(state, 40)
    db = state / "queue.sqlite3"
    raw = bytearray(db.read_bytes())
    rng = random.Random(4)
    page = 4096
    for victim in (len(raw) // page // 2, len(raw) // page // 3):  # two pages inside the file
        raw[victim * page : (victim + 1) * page] = rng.randbytes(page)
    db.write_bytes(bytes(raw))
    server = ServerProcess.start(config)
    try:
        delivered = await _wait_delivered(state, 30)
        assert len(delivered) >= 30, f"only {len(delivered)} of 40 delivered"
        assert server.proc.poll() is None, "the server keeps running"
        assert server.wait_for_log("queue.database_recovered") or server.wait_for_log(
            "queue.damaged"
        )
        result = _queue_list(config)
        assert result.returncode == 0, result.stderr
    finally:
        assert server.stop(signal.SIGTERM) == 0
    if server.wait_for_log("queue.database_recovered", timeout=0):
        assert list(state.glob("queue.sqlite3.damaged-*")), "the damaged file is kept"


async def test_truncated_database_is_recovered(tmp_path: Path) -> None:
    config, state = _setup(tmp_path)
    _queue_inline(state, 40)
    db = state / "queue.sqlite3"
    os.truncate(db, db.stat().st_size * 2 // 3)
    listed = run_cli("queue", "list", "--config", str(config))
    assert "Traceback" not in listed.stderr + listed.stdout, listed.stderr
    server = ServerProcess.start(config)
    try:
        assert server.wait_for_log("queue.database_recovered")
        delivered = await _wait_delivered(state, 10)
        assert len(delivered) >= 10, f"only {len(delivered)} of 40 delivered"
        await trio.sleep(1)
        listed = json.loads(_queue_list(config, "--json").stdout)
        # Every message is accounted for: delivered, or kept and shown as damaged.
        assert all(row.get("damaged") for row in listed), listed
        assert len(_delivered(state)) + len(listed) == 40
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert list(state.glob("queue.sqlite3.damaged-*")), "the damaged file is kept"


async def test_non_database_file_is_refused_with_one_line(tmp_path: Path) -> None:
    config, state = _setup(tmp_path)
    db = state / "queue.sqlite3"
    db.write_bytes(b"this is not a database, it is a text file\n" * 100)
    _one_line_refusal(run_cli("serve", "--config", str(config)), db, "not an SQLite database")
    _one_line_refusal(_queue_list(config), db, "not an SQLite database")
    assert db.read_bytes().startswith(b"this is not"), "the file is left as it was"


async def test_zero_length_database_is_refused_with_one_line(tmp_path: Path) -> None:
    config, state = _setup(tmp_path)
    db = state / "queue.sqlite3"
    db.write_bytes(b"")
    _one_line_refusal(run_cli("serve", "--config", str(config)), db, "is empty")
    _one_line_refusal(_queue_list(config), db, "is empty")
    assert db.exists() and db.stat().st_size == 0
