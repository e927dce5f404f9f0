"""Privilege drop (SPEC §11): started as root with ``user``, every process of the server
runs as that user before the first connection, yet binds a port below 1024, serves TLS
with a key only root may read, and writes queue and Maildir files owned by the user.

The test user is made with useradd and removed afterwards. This machine's Python may
live where that user cannot go (/root/.pyenv, mode 0700): the server then runs in a
private mount namespace (unshare) in which those folders are reachable; nothing
outside that one process tree changes.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import random
import shlex
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

import trio_mta
from trio_mta.config import Config
from trio_mta.mta import MTA, serve
from trio_mta.server.passwords import PasswordFile

from .proc import ServerProcess, run_cli

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd"), reason="needs root and useradd"
)


@pytest.fixture
def account() -> Iterator[pwd.struct_passwd]:
    name = f"triomta{random.randrange(10**6):06d}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        if any(g.gr_name == name for g in grp.getgrall()):
            subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A folder any user may enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="trio-mta-privileges-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _blocked_for_others(paths: list[Path]) -> dict[Path, set[str]]:
    """For each folder others may not enter on the way to ``paths``: the names under it
    that must be reachable."""
    blocked: dict[Path, set[str]] = {}
    for path in paths:
        parts = path.parts
        for depth in range(1, len(parts) - 1):
            ancestor = Path(*parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                blocked.setdefault(ancestor, set()).add(parts[depth])
                break
    return blocked


def reachable_prefix(view_root: Path) -> tuple[str, ...]:
    """A command prefix that runs its arguments where any user reaches this Python,
    its packages and trio_mta: each folder closed to others on the way is replaced,
    in a private mount namespace only, by one that holds just those entries."""
    needed = {
        Path(os.path.realpath(sys.executable)),
        Path(sys.base_prefix),
        Path(sys.prefix),
        Path(trio_mta.__file__).parent.parent,
    }
    needed |= {Path(p) for p in sys.path if p and os.path.exists(p)}
    blocked = _blocked_for_others(sorted(needed))
    if not blocked:
        return ()
    lines = ["set -e"]
    for index, (ancestor, names) in enumerate(sorted(blocked.items())):
        view = view_root / f"view{index}"
        view.mkdir(parents=True)
        view.chmod(0o711)
        for name in sorted(names):
            source = ancestor / name
            target = view / name
            if source.is_dir():
                target.mkdir()
            else:
                target.touch()
            lines.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}")
        lines.append(f"mount --rbind {shlex.quote(str(view))} {shlex.quote(str(ancestor))}")
    lines.append('exec "$@"')
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make this Python reachable for another user: {probe.stderr!r}")
    return ("unshare", "--mount", "sh", "-c", "\n".join(lines), "sh")


def free_privileged_port() -> int:
    for _ in range(200):
        port = random.randrange(600, 1000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 600..999 on 127.0.0.1")


def ids(pid: int) -> dict[str, list[int]]:
    status = Path(f"/proc/{pid}/status").read_text()
    out = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(x) for x in value.split()]
    return out


def write_config(data: Path, port: int, user: str, workers: int) -> Path:
    etc = data / "etc"
    etc.mkdir(mode=0o700)  # root's alone: read before the drop, or not at all
    PasswordFile(etc / "passwd").set_password("alice", "s3cret")
    config = data / "mta.toml"
    config.write_text(f"""\
hostname = "mx.example.test"
state_dir = "state"
user = "{user}"
[[listen]]
address = "127.0.0.1:{port}"
mode = "smtp"
[[listen]]
address = "127.0.0.1:0"
mode = "submission"
[local]
domains = ["example.test"]
[auth]
users_file = "etc/passwd"
[server]
workers = {workers}
""")
    return config


def wait_for_files(folder: Path, timeout: float = 20) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(folder.glob("*")) if folder.is_dir() else []
        if files:
            return files
        time.sleep(0.05)
    raise AssertionError(f"nothing in {folder} after {timeout}s")


@pytest.mark.parametrize("workers", [1, 2])
def test_every_process_runs_as_user_and_still_serves_a_low_port(
    account: pwd.struct_passwd, data_dir: Path, workers: int
) -> None:
    port = free_privileged_port()
    config = write_config(data_dir, port, account.pw_name, workers)
    server = ServerProcess.start(
        config, wait_for=2, timeout=60, prefix=reachable_prefix(data_dir / "views")
    )
    try:
        assert server.ports["smtp"] == port
        pids = [server.proc.pid, *server.worker_pids().values()]
        assert len(pids) == (1 if workers == 1 else 1 + workers)
        for pid in pids:
            seen = ids(pid)
            assert seen["Uid"] == [account.pw_uid] * 4, (pid, seen)  # real, eff, saved, fs
            assert seen["Gid"] == [account.pw_gid] * 4, (pid, seen)
            assert seen["Groups"] == [account.pw_gid], (pid, seen)
        context = ssl._create_unverified_context()  # the generated self-signed pair
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.starttls(context=context)
            client.sendmail(
                "alice@remote.test", ["bob@example.test"], b"Subject: low port\r\n\r\nHello.\r\n"
            )
        # The users file is root's alone (mode 0600 in a 0700 folder): read before the drop.
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
            client.starttls(context=context)
            client.login("alice", "s3cret")
        [mail] = wait_for_files(data_dir / "state" / "mail" / "bob" / "new")
        assert mail.stat().st_uid == account.pw_uid
        assert mail.read_bytes().startswith(b"Return-Path: <alice@remote.test>")
        for path in (data_dir / "state").rglob("*"):
            assert path.stat().st_uid == account.pw_uid, path
        assert (data_dir / "etc" / "passwd").stat().st_uid == 0, "the operator's file is kept"
    finally:
        code = server.stop()
    assert code == 0, "".join(server.log)
    assert server.count_log("privileges.dropped") == 1, "once, in the process that binds"


def test_a_state_dir_the_user_cannot_write_is_a_one_line_error(
    account: pwd.struct_passwd, data_dir: Path
) -> None:
    config = write_config(data_dir, free_privileged_port(), account.pw_name, 1)
    (data_dir / "state").mkdir(mode=0o700)  # left by an earlier run as root
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"trio-mta: config: state_dir: user {account.pw_name} cannot "
        f"write to {data_dir / 'state'} (owner root, mode drwx------)"
    )


def test_queue_files_left_by_root_are_named_before_serving(
    account: pwd.struct_passwd, data_dir: Path
) -> None:
    config = write_config(data_dir, free_privileged_port(), account.pw_name, 1)
    state = data_dir / "state"
    state.mkdir()
    os.chown(state, account.pw_uid, account.pw_gid)
    (state / "queue.sqlite3").write_bytes(b"")
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert f"cannot write to {state / 'queue.sqlite3'} (owner root" in line
    assert line.startswith("trio-mta: config: state_dir: ")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('user = "no-such-user-here"', "trio-mta: config: user: no such user"),
        ('user = "root"', "trio-mta: config: user: must not be root"),
        ('user = "nobody"\ngroup = "no-such-group-here"', "trio-mta: config: group: no such group"),
        ('group = "nogroup"', "trio-mta: config: group: only applies with user"),
    ],
)
def test_check_config_names_a_bad_user_or_group(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "mta.toml"
    config.write_text(toml + "\n")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr


async def test_running_as_root_without_user_logs_a_warning(
    nursery: trio.Nursery, make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    server: MTA = await nursery.start(serve, make_config())
    assert server.config.user is None
    assert any(r.getMessage() == "privileges.running_as_root" for r in caplog.records)
