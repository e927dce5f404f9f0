"""``[server] workers`` (SPEC §12): real processes, real sockets, real signals."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from trio_mta.workers.supervisor import MAX_DELAY, restart_delay

from .dnsserver import DnsServer
from .proc import ServerProcess, run_cli

BASE = """
hostname = "mx.workers.test"
state_dir = "state"
[[listen]]
address = "{listen}"
mode = "smtp"
[local]
domains = ["workers.test"]
[queue]
retry_initial = "1s"
retry_max = "1s"
[server]
workers = {workers}
"""


def write_config(
    tmp_path: Path, extra: str = "", *, workers: int = 2, listen: str = "127.0.0.1:0"
) -> Path:
    path = tmp_path / "mta.toml"
    path.write_text(BASE.format(workers=workers, listen=listen) + extra)
    return path


def send(port: int, rcpt: str, body: bytes = b"Subject: w\r\n\r\nhello\r\n") -> str:
    """One message on a fresh connection; the queue ID of the 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("c.test")
        assert client.mail("a@client.test")[0] == 250
        assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(body)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def worker_of(queue_id: str) -> int:
    """The worker number in a queue ID (two base32 digits after the host tag)."""
    digits = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    tail = queue_id[-2:]
    return digits.index(tail[0]) * 32 + digits.index(tail[1])


def send_until_both(port: int, rcpt: str, limit: int = 60) -> list[str]:
    """Send on new connections until both workers accepted at least two messages."""
    ids: list[str] = []
    while len(ids) < limit:
        ids.append(send(port, rcpt))
        seen = [worker_of(i) for i in ids]
        if seen.count(0) >= 2 and seen.count(1) >= 2:
            return ids
    raise AssertionError(f"one worker took every connection: {ids}")


def wait_until(check: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def files(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").glob("*")) if (maildir / "new").is_dir() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def block_mailbox(tmp_path: Path, name: str) -> Path:
    """A regular file where the Maildir folder should be: delivery defers until it goes."""
    root = tmp_path / "state" / "mail"
    root.mkdir(parents=True, exist_ok=True)
    blocker = root / name
    blocker.write_text("not a maildir")
    return blocker


def test_two_workers_share_connections_and_deliver(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[metrics]\nlisten = "127.0.0.1:0"\n')
    server = ServerProcess.start(config)
    try:
        assert server.workers == 2
        ids = [send(server.ports["smtp"], "bob@workers.test") for _ in range(30)]
        by_worker = [worker_of(i) for i in ids]
        assert set(by_worker) == {0, 1}, "the kernel gave every connection to one worker"
        assert len(set(ids)) == 30
        maildir = tmp_path / "state" / "mail" / "bob"
        assert wait_until(lambda: len(files(maildir)) == 30), len(files(maildir))
        # The parent serves the sum over workers.
        assert server.wait_for_log("metrics.listening")
        line = next(x for x in server.log if "metrics.listening" in x)
        port = int(line.rsplit(":", 1)[1])
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b'trio_mta_messages_accepted_total{listener="smtp"} 30.0' in text
        assert b"trio_mta_workers 2.0" in text
    finally:
        assert server.stop() == 0
    # Every line a worker logs names it.
    accepted = [x for x in server.log if "smtpd.accepted" in x or "queue.delivered" in x]
    assert accepted and all(" worker=0" in x or " worker=1" in x for x in accepted)


def test_supervisor_stays_small(tmp_path: Path) -> None:
    """The parent binds, prepares and supervises; the queue and DKIM live in the
    workers only, so the parent maps neither SQLite nor libsodium (PyNaCl)."""
    server = ServerProcess.start(write_config(tmp_path))
    try:
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        loaded = {lib for lib in ("_sqlite3", "_sodium") if lib in maps}
        assert loaded == set()
        for pid in server.worker_pids().values():
            assert "_sqlite3" in Path(f"/proc/{pid}/maps").read_text()
    finally:
        assert server.stop() == 0


def test_killed_worker_is_restarted_and_its_shard_delivered(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    blocker = block_mailbox(tmp_path, "held")
    server = ServerProcess.start(config)
    try:
        ids = send_until_both(server.ports["smtp"], "held@workers.test")
        old = server.worker_pids()
        os.kill(old[1], signal.SIGKILL)
        assert wait_until(lambda: server.worker_pids().get(1, old[1]) != old[1]), server.log
        assert server.wait_for_log("worker.died worker=1 status=SIGKILL")
        assert server.wait_for_log("worker.ready", count=3, timeout=30)
        new = server.worker_pids()
        assert new[0] == old[0] and alive(new[1])
        blocker.unlink()
        maildir = tmp_path / "state" / "mail" / "held"
        assert wait_until(lambda: len(files(maildir)) >= len(ids)), server.log
        # Worker 1's shard was delivered by its successor (Maildir names carry the pid).
        assert any(f"P{new[1]}Q" in path.name for path in files(maildir))
        assert not any(f"P{old[1]}Q" in path.name for path in files(maildir))
    finally:
        assert server.stop() == 0
    delivered = b"".join(path.read_bytes() for path in files(maildir))
    assert all(queue_id.encode() in delivered for queue_id in ids)


def test_queue_commands_see_every_shard(tmp_path: Path, dns_server: DnsServer) -> None:
    host, port = dns_server.address
    config = write_config(tmp_path, f'[dns]\nnameservers = ["{host}:{port}"]\n')
    server = ServerProcess.start(config)  # remote.test: SERVFAIL, so mail stays deferred
    try:
        ids = send_until_both(server.ports["smtp"], "far@remote.test")
        assert (tmp_path / "state" / "queue-1.sqlite3").exists()
        listed = run_cli("queue", "list", "--json", "--config", str(config))
        assert listed.returncode == 0, listed.stderr
        assert sorted(row["id"] for row in json.loads(listed.stdout)) == sorted(ids)
        human = run_cli("queue", "list", "--config", str(config)).stdout
        assert all(queue_id in human for queue_id in ids)
        first = {worker_of(i): i for i in ids}
        for queue_id in first.values():
            shown = run_cli("queue", "show", queue_id, "--config", str(config))
            assert shown.returncode == 0 and "far@remote.test" in shown.stdout
        flushed = run_cli("queue", "flush", "--config", str(config))
        assert flushed.stdout.strip() == f"{len(ids)} recipient(s) due now"
        one = run_cli("queue", "flush", first[1], "--config", str(config))
        assert one.returncode == 0 and one.stdout.strip() == "1 recipient(s) due now"
        for queue_id in first.values():
            assert run_cli("queue", "delete", queue_id, "--config", str(config)).returncode == 0
        after = json.loads(run_cli("queue", "list", "--json", "--config", str(config)).stdout)
        assert sorted(row["id"] for row in after) == sorted(set(ids) - set(first.values()))
        assert run_cli("queue", "delete", first[1], "--config", str(config)).returncode == 1
    finally:
        assert server.stop() == 0


def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    mapped = '[local.mailboxes]\n"alice@workers.test" = "alice"\n'
    config = write_config(tmp_path, mapped)
    server = ServerProcess.start(config)
    try:
        port = server.ports["smtp"]
        for _ in range(6):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.ehlo("c.test")
                client.mail("a@client.test")
                assert client.rcpt("bob@workers.test")[0] == 550
        config.write_text(
            BASE.format(workers=2, listen="127.0.0.1:0") + mapped + '"bob@workers.test" = "bob"\n'
        )
        server.proc.send_signal(signal.SIGHUP)
        assert server.wait_for_log("config.reloaded", count=2), server.log
        # Whichever worker takes the connection, bob is a mailbox now.
        ids = send_until_both(port, "bob@workers.test")
        assert wait_until(lambda: len(files(tmp_path / "state" / "mail" / "bob")) == len(ids))
    finally:
        assert server.stop() == 0
    assert server.count_log("mta.signal signal=SIGHUP worker=") == 2


def test_sigterm_stops_every_worker_and_exits_0(tmp_path: Path) -> None:
    server = ServerProcess.start(write_config(tmp_path))
    pids = server.worker_pids()
    assert len(pids) == 2 and all(alive(pid) for pid in pids.values())
    assert server.stop(signal.SIGTERM) == 0
    assert server.count_log("mta.stopped worker=") == 2
    assert server.count_log("mta.stopped workers=2") == 1
    assert not any(alive(pid) for pid in pids.values())


def test_workers_stop_when_the_parent_dies(tmp_path: Path) -> None:
    server = ServerProcess.start(write_config(tmp_path))
    pids = server.worker_pids()
    server.kill()  # SIGKILL: no chance to forward anything
    assert wait_until(lambda: not any(alive(pid) for pid in pids.values())), server.log
    assert server.count_log("worker.parent_gone") == 2


def test_fewer_workers_still_deliver_every_shard(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    blocker = block_mailbox(tmp_path, "held")
    server = ServerProcess.start(config)
    try:
        ids = send_until_both(server.ports["smtp"], "held@workers.test")
    finally:
        assert server.stop() == 0
    blocker.unlink()
    single = ServerProcess.start(write_config(tmp_path, workers=1))
    maildir = tmp_path / "state" / "mail" / "held"
    try:
        assert single.workers == 1 and single.wait_for_log("queue.draining shard=1")
        assert wait_until(lambda: len(files(maildir)) >= len(ids)), single.log
    finally:
        assert single.stop() == 0
    delivered = b"".join(path.read_bytes() for path in files(maildir))
    assert all(queue_id.encode() in delivered for queue_id in ids)


def test_second_instance_cannot_share_the_port(tmp_path: Path) -> None:
    # SO_REUSEPORT alone would let a second server join the first one's port.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    first_dir = tmp_path / "first"
    first_dir.mkdir()
    first = ServerProcess.start(write_config(first_dir, listen=f"127.0.0.1:{port}"))
    try:
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        result = run_cli(
            "serve", "--config", str(write_config(second_dir, listen=f"127.0.0.1:{port}"))
        )
        assert result.returncode == 1
        assert (
            f"trio-mta: cannot listen on 127.0.0.1:{port} (smtp): address already in use"
            in result.stderr.splitlines()
        )
        assert "Traceback" not in result.stderr
    finally:
        assert first.stop() == 0


@pytest.mark.parametrize("failures", [1, 2, 5, 50])
def test_restart_delay_grows_and_is_capped(failures: int) -> None:
    assert restart_delay(failures) <= MAX_DELAY
    assert restart_delay(failures + 1) >= restart_delay(failures)
    assert restart_delay(50) == MAX_DELAY and restart_delay(1) < 1


@pytest.mark.parametrize(("workers", "shard"), [(1, "queue.sqlite3"), (2, "queue-1.sqlite3")])
def test_broken_queue_shard_is_a_one_line_error(tmp_path: Path, workers: int, shard: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / shard).write_bytes(b"this is not an SQLite database, not even close " * 4)
    result = run_cli("serve", "--config", str(write_config(tmp_path, workers=workers)))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("trio-mta:")]
    # One line that names the file, what is wrong and what to do (docs/queue.md "Damage").
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(
        f"trio-mta: queue database {state / shard} is not an SQLite"
        " database: restore it from a backup"
    ), errors
