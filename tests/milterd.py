"""Real milters run privately for tests and the benchmark: rspamd and OpenDKIM.

Each gets its own configuration under a scratch folder, listens on a free
loopback port, uses only the given loopback name server, and is stopped by
its PID. The system's own instances (Debian starts rspamd on install) are
never used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

RSPAMD_START_TIMEOUT = 300.0  # loading the rules takes a minute on a loaded machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"milter exited with {proc.returncode}: {tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"milter not listening on {port} after {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


RSPAMD_CONF = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "{dir}/rspamd.pid";
    .include "$CONFDIR/options.inc"
    dns {{ nameserver = ["{dns}"]; timeout = 0.5s; retransmits = 1; }}
    disable_hyperscan = {no_hyperscan};
}}
logging {{ type = "file"; filename = "{dir}/rspamd.log"; level = "warning"; }}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 120s;
    upstream "local" {{ default = yes; self_scan = yes; }}
    count = {workers};
}}
"""

# Which headers rspamd's milter adds is the milter_headers module's `use` list
# (empty by default): X-Spamd-Result carries the verdict and symbols.
MILTER_HEADERS = (
    'use = ["x-spamd-result", "x-rspamd-queue-id"];\n'
    "skip_local = false;\nskip_authenticated = false;\n"
)


@contextlib.contextmanager
def rspamd(
    directory: Path,
    dns: tuple[str, int],
    *,
    workers: int = 1,
    hyperscan: bool = False,
    db_dir: Path | None = None,
) -> Iterator[str]:
    """A private rspamd proxy in milter mode; yields its ``host:port``.

    The tests' defaults start fast: one proxy process, and no hyperscan (compiling
    its databases takes minutes on this machine). The benchmark asks for what a
    production rspamd runs: one scanning process per core, regexes in hyperscan,
    and a ``db_dir`` that keeps the compiled databases from one run to the next.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if db_dir is not None:
        db_dir.mkdir(parents=True, exist_ok=True)
    (directory / "local.d").mkdir(exist_ok=True)
    (directory / "local.d" / "milter_headers.conf").write_text(MILTER_HEADERS)
    # No redis: modules that need it turn themselves off; say so to keep the log short.
    (directory / "local.d" / "redis.conf").write_text("")
    port = free_port()
    conf = directory / "rspamd.conf"
    conf.write_text(
        RSPAMD_CONF.format(
            dir=directory,
            dns="{}:{}".format(*dns),
            port=port,
            workers=workers,
            no_hyperscan="false" if hyperscan else "true",
        )
    )
    log = directory / "stderr.log"
    binary = shutil.which("rspamd") or "rspamd"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                "-f",
                "-u",
                "root",
                "-g",
                "root",
                "-c",
                str(conf),
                "--var",
                f"LOCAL_CONFDIR={directory}",
                "--var",
                f"DBDIR={db_dir or directory}",
                "--var",
                f"RUNDIR={directory}",
                "--var",
                f"LOGDIR={directory}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_listening(port, proc, RSPAMD_START_TIMEOUT, directory / "rspamd.log")
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


@contextlib.contextmanager
def opendkim(directory: Path, domain: str, selector: str = "test") -> Iterator[tuple[str, str]]:
    """A private OpenDKIM signing for ``domain``; yields ``(host:port, DNS TXT of the key)``."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["opendkim-genkey", "-D", str(directory), "-d", domain, "-s", selector, "-b", "1024"],
        check=True,
    )
    txt = (directory / f"{selector}.txt").read_text()
    record = "".join(part.split('"')[1] for part in txt.split("\n") if '"' in part)
    port = free_port()
    conf = directory / "opendkim.conf"
    conf.write_text(
        f"Domain {domain}\nKeyFile {directory / (selector + '.private')}\n"
        f"Selector {selector}\nSocket inet:{port}@127.0.0.1\nMode s\n"
        f"Canonicalization relaxed/simple\nBackground no\nSyslog no\n"
        f"PidFile {directory / 'opendkim.pid'}\nInternalHosts 127.0.0.1\n"
        "RequireSafeKeys no\n"
    )
    log = directory / "stderr.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["opendkim", "-f", "-x", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_listening(port, proc, 30, log)
        yield f"127.0.0.1:{port}", record
    finally:
        _stop(proc)
