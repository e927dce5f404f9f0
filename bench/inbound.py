"""Inbound benchmark: trio_mta beside Postfix and aiosmtpd, in the same run.

Every figure is a median of R runs; every run prints its exact command line.
Throughput comes from Postfix's smtp-source (one connection per message, its
default); DATA-reply latency and the idle-connection test come from the trio
load generator in bench/loadgen.py. Peak RSS and fsync counts are taken from
/proc and strace on the trio_mta server process. See bench/README.md.

    python bench/inbound.py --quick          # smoke run, a minute or two
    python bench/inbound.py                  # full run: 2 sizes x 3 sessions x 3 servers x R=3

Never fails on timing: it prints what it measured. Exit 1 only when the
benchmark could not be set up (trio_mta does not start, smtp-source missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOADGEN = HERE / "loadgen.py"
DEFAULT_PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"
HOST = "127.0.0.1"
SENDER = "a@bench.test"
RCPT = "u@bench.test"
TARGETS = ("trio", "postfix", "aiosmtpd")
LABEL = {"trio": "trio_mta", "postfix": "Postfix", "aiosmtpd": "aiosmtpd"}
POLL = 0.02  # seconds between Maildir counts: 20 ms resolution on multi-second runs
WARMUP = 2  # unmeasured messages per session sent to a server instance before it is measured


class SetupError(Exception):
    """The benchmark cannot run at all (not a slow or failing server: those are figures)."""


def say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- helpers


def wait_port(port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll-connect 127.0.0.1:port until it accepts, `alive()` turns false, or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def count_new(new_dir: Path) -> int:
    try:
        with os.scandir(new_dir) as it:
            return sum(1 for e in it if not e.name.startswith("."))
    except FileNotFoundError:
        return 0


def clear_maildir(maildir: Path) -> None:
    """Remove the files (never the folders) of a Maildir, so the next run counts from 0."""
    for sub in ("new", "cur", "tmp"):
        try:
            with os.scandir(maildir / sub) as it:
                for entry in it:
                    if entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
        except FileNotFoundError:
            pass


def proc_status(pid: int) -> dict[str, int]:
    """Vm* fields of /proc/PID/status in KiB ({} when the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.startswith("Vm"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def cpu_seconds(pid: int) -> float | None:
    """utime+stime of a process (all its threads), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a supervisor and its workers under ``--workers``)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        out.append(current)
        # Per thread: trio starts processes from its worker threads.
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(child) for child in (task / "children").read_text().split())
    return out


def tree_cpu(pids: Sequence[int]) -> float | None:
    """CPU of every process in ``pids``; None when one of them is gone."""
    values = [cpu_seconds(pid) for pid in pids]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def loops(pids: Sequence[int]) -> list[int]:
    """The processes whose main thread is an event loop: the workers, else the one process."""
    return list(pids[1:]) if len(pids) > 1 else list(pids)


def tree_schedstat(pids: Sequence[int]) -> tuple[float, float] | None:
    """schedstat of every event-loop thread in ``pids``, summed."""
    stats = [schedstat(pid, pid) for pid in loops(pids)]
    if not stats or any(s is None for s in stats):
        return None
    return (sum(s[0] for s in stats if s is not None), sum(s[1] for s in stats if s is not None))


def schedstat(pid: int, tid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of one thread."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            on_cpu, waiting, _ = f.read().split()
        return int(on_cpu) / 1e9, int(waiting) / 1e9
    except (OSError, ValueError):
        return None


def traced(pid: int) -> bool:
    """True when every thread of `pid` has a tracer attached."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                tracer = next((ln for ln in f if ln.startswith("TracerPid:")), "TracerPid: 0")
        except OSError:
            continue
        if tracer.split()[1] == "0":
            return False
    return True


def apt_install(package: str) -> None:
    """Install a Debian package non-interactively (postfix with "No configuration")."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if package == "postfix":
        subprocess.run(
            ["debconf-set-selections"],
            input=b"postfix postfix/main_mailer_type select No configuration\n",
            env=env,
            check=False,
            timeout=60,
        )
    say(f"# installing {package}: apt-get install -y {package}")
    subprocess.run(
        ["apt-get", "install", "-y", package],
        env=env,
        check=False,
        timeout=900,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def ensure_tool(tool: str, package: str) -> str | None:
    path = shutil.which(tool)
    if path is None:
        apt_install(package)
        path = shutil.which(tool)
    return path


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


# ---------------------------------------------------------------- servers


@dataclass
class Target:
    """A server under load: where it listens and where its Maildir is."""

    name: str
    port: int
    maildir: Path
    pid: int | None = None  # server process whose CPU (and, for trio_mta, RSS) is read

    @property
    def new_dir(self) -> Path:
        return self.maildir / "new"


class TrioServer:
    """`python -m trio_mta serve` as a subprocess with a fresh state_dir per start."""

    def __init__(
        self, root: Path, port: int, log_level: str, workers: int = 1, milter: str | None = None
    ) -> None:
        self.root = root
        self.milter = milter
        self.port = port
        self.log_level = log_level
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = root / "bench.toml"
        self.state = root / "state"
        self.command = [sys.executable, "-m", "trio_mta", "serve", "--config", str(self.config)]
        self.extra_config = ""  # more TOML (bench/mailauth.py: [[dkim.sign]], [verify])

    def target(self) -> Target:
        pid = self.proc.pid if self.proc else None
        return Target("trio", self.port, self.state / "mail" / "u", pid)

    def write_config(self) -> None:
        self.config.write_text(
            f'hostname = "bench-trio.localdomain"\n'
            f'state_dir = "{self.state}"\n'
            f'[[listen]]\naddress = "{HOST}:{self.port}"\nmode = "smtp"\n'
            f'[local]\ndomains = ["bench.test"]\n'
            f"[limits]\nmax_connections = 20000\nmax_connections_per_ip = 20000\n"
            f'[log]\nlevel = "{self.log_level}"\n'
            f"[server]\nworkers = {self.workers}\n"
            + (f'[[milter]]\naddress = "{self.milter}"\ntimeout = "60s"\n' if self.milter else "")
            + self.extra_config
        )

    def start(self) -> Target:
        if port_open(self.port):
            raise SetupError(f"{HOST}:{self.port} already accepts connections; pick --port")
        shutil.rmtree(self.state, ignore_errors=True)
        self.write_config()
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc
        if not wait_port(self.port, 60, lambda: proc.poll() is None):
            self.stop()
            raise SetupError(
                f"trio_mta did not start listening on {HOST}:{self.port}; "
                f"last log lines:\n{self.log_tail()}"
            )
        return self.target()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)  # graceful stop: up to 30 s for sessions, then exit 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = (self.root / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Peer:
    """A comparison peer run by one of the ../shared/peers scripts."""

    name: str
    script: Path
    port: int
    maildir: Path
    env: dict[str, str]
    started_by_us: bool = False

    def run(self, action: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(self.script), action],
            env=self.env,
            text=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> str | None:
        """Start unless already running; returns an error text or None."""
        try:
            running = self.run("status", 30).returncode == 0
            if not running:
                if self.name == "postfix":
                    postfix_main_cf()
                say(
                    f"# starting {self.name}: PEERS_DIR={self.env['PEERS_DIR']} "
                    f"bash {self.script} start"
                )
                res = self.run("start", 900)
                if res.returncode != 0:
                    return f"{self.script.name} start failed: {(res.stderr or res.stdout)[-500:]}"
                self.started_by_us = True
            else:
                say(f"# {self.name} already running; it is used as is and left running")
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{self.script.name}: {exc}"
        if not wait_port(self.port, 30):
            return f"{self.name} does not accept on {HOST}:{self.port}"
        return None

    def stop(self) -> None:
        if self.started_by_us:
            say(f"# stopping {self.name}: bash {self.script} stop")
            try:
                self.run("stop", 60)
            except (OSError, subprocess.TimeoutExpired) as exc:
                say(f"# {self.name} stop: {exc}")
            self.started_by_us = False

    def target(self) -> Target:
        return Target(self.name, self.port, self.maildir, self.server_pid())

    def server_pid(self) -> int | None:
        """aiosmtpd is one process (its pidfile): its CPU per message is comparable."""
        if self.name != "aiosmtpd":
            return None  # Postfix is a family of short- and long-lived processes
        try:
            pid = int((Path(self.env["PEERS_DIR"]) / "run" / "aiosmtpd.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if cpu_seconds(pid) is not None else None


def postfix_main_cf() -> None:
    """Give a "No configuration" Postfix install the main.cf that postfix.sh edits.

    Debian's "No configuration" choice installs no /etc/postfix/main.cf, and
    ``postconf -e`` in postfix.sh cannot edit a file that is not there. Debian's
    own default (what its other choices start from) is the faithful base.
    """
    main_cf = Path("/etc/postfix/main.cf")
    if main_cf.exists() or not main_cf.parent.is_dir():
        return
    base = Path("/usr/share/postfix/main.cf.debian")
    say(
        f"# {main_cf} is missing (Debian 'No configuration'): starting it from "
        f"{base if base.is_file() else 'an empty file'}"
    )
    main_cf.write_bytes(base.read_bytes() if base.is_file() else b"")


def _loopback_port(variable: str, default: str) -> int:
    """Port of a peer address from the scripts' environment override; loopback only."""
    host, _, port = os.environ.get(variable, default).rpartition(":")
    if host.strip("[]") not in (HOST, "::1", "localhost"):
        raise SetupError(f"{variable}={host}:{port}: only loopback peers are allowed")
    return int(port)


def make_peers(peers: Path, only: Sequence[str]) -> list[Peer]:
    """Peers as the scripts will run them (same PEERS_DIR, data and address overrides)."""
    work = Path(
        os.environ.get("PEERS_DIR") or Path(os.environ.get("TMPDIR") or "/tmp") / "trio-mta-peers"
    )
    env = dict(os.environ, PEERS_DIR=str(work))
    out = []
    if "postfix" in only:
        data = Path(os.environ.get("POSTFIX_DATA") or work / "postfix")
        out.append(
            Peer(
                "postfix",
                peers / "postfix.sh",
                _loopback_port("POSTFIX_ADDR", f"{HOST}:2601"),
                data / "Maildir",
                env,
            )
        )
    if "aiosmtpd" in only:
        data = Path(os.environ.get("AIOSMTPD_DATA") or work / "aiosmtpd")
        out.append(
            Peer(
                "aiosmtpd",
                peers / "aiosmtpd.sh",
                _loopback_port("AIOSMTPD_ADDR", f"{HOST}:2602"),
                data / "Maildir",
                env,
            )
        )
    for peer in out:
        if not peer.script.is_file():
            raise SetupError(f"{peer.script} not found (use --peers DIR)")
    return out


# ---------------------------------------------------------------- one run


@dataclass
class Run:
    """One measured client run against one server."""

    target: str
    kind: str  # "source" (smtp-source) or "loadgen"
    size: int
    sessions: int
    rep: int
    command: str
    messages: int
    error: str | None = None
    client_s: float | None = None  # client wall time: all DATA answered
    delivered_s: float | None = None  # until `messages` files sit in new/
    delivered_files: int = 0
    peak_rss_kib: int | None = None
    cpu_s: float | None = None  # server process CPU during the run (not Postfix)
    loop_cpu_s: float | None = None  # trio_mta's event-loop (main) thread: on a CPU
    loop_wait_s: float | None = None  # ... and runnable, waiting for a CPU
    loadgen: dict[str, object] = field(default_factory=dict)

    @property
    def accepted_rate(self) -> float | None:
        return self.messages / self.client_s if self.client_s and not self.error else None

    @property
    def delivered_rate(self) -> float | None:
        return self.messages / self.delivered_s if self.delivered_s and not self.error else None


def drive(
    cmd: list[str], target: Target, messages: int, timeout: float, out_path: Path
) -> tuple[int | None, float | None, float | None, int, str]:
    """Run a client to completion while counting target's new/; never waits past `timeout`.

    Returns (exit status, client wall s, seconds until `messages` files in new/,
    files seen, client output).
    """
    done_at: list[float] = []
    with open(out_path, "w+b") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )

        def waiter() -> None:
            proc.wait()
            done_at.append(time.perf_counter())

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        deadline = t0 + timeout
        delivered_at: float | None = None
        seen = 0
        try:
            delivered_at, seen = _count_until(target, messages, proc, done_at, deadline)
        finally:
            if not done_at:
                proc.kill()
            thread.join(10)
        out.seek(0)
        output = out.read().decode("utf-8", "replace")
    client_s = done_at[0] - t0 if done_at else None
    delivered_s = delivered_at - t0 if delivered_at is not None else None
    return proc.returncode, client_s, delivered_s, seen, output


def _count_until(
    target: Target,
    messages: int,
    proc: subprocess.Popen[bytes],
    done_at: list[float],
    deadline: float,
) -> tuple[float | None, int]:
    """Poll new/ until `messages` files and the client is done, it failed, or the deadline."""
    delivered_at: float | None = None
    seen = 0
    while True:
        if delivered_at is None:
            seen = count_new(target.new_dir)
            if seen >= messages:
                delivered_at = time.perf_counter()
        now = time.perf_counter()
        if done_at and delivered_at is not None:
            break
        # a failed client will not bring the count to `messages`: 2 s grace, then stop
        if done_at and proc.returncode != 0 and now > done_at[0] + 2:
            break
        if now > deadline:
            break
        time.sleep(POLL)
    return delivered_at, seen


def source_cmd(target: Target, size: int, sessions: int, messages: int) -> list[str]:
    return [
        "smtp-source",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        SENDER,
        "-t",
        RCPT,
        f"{HOST}:{target.port}",
    ]


def loadgen_cmd(target: Target, size: int, sessions: int, messages: int) -> list[str]:
    return [
        sys.executable,
        str(LOADGEN),
        "send",
        "--port",
        str(target.port),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        SENDER,
        "-t",
        RCPT,
    ]


def measure(
    target: Target,
    kind: str,
    size: int,
    sessions: int,
    rep: int,
    messages: int,
    timeout: float,
    workdir: Path,
) -> Run:
    """Clear the Maildir, run one client, and judge the result."""
    make = source_cmd if kind == "source" else loadgen_cmd
    cmd = make(target, size, sessions, messages)
    run = Run(target.name, kind, size, sessions, rep, shlex.join(cmd), messages)
    clear_maildir(target.maildir)
    # trio_mta under --workers: the supervisor and its workers, loops summed.
    pids = (
        process_tree(target.pid)
        if target.pid and target.name == "trio"
        else ([target.pid] if target.pid else [])
    )
    cpu0 = tree_cpu(pids) if pids else None
    loop0 = tree_schedstat(pids) if pids else None
    rc, client_s, delivered_s, seen, output = drive(
        cmd, target, messages, timeout, workdir / "client.out"
    )
    if pids:
        cpu1 = tree_cpu(pids)
        loop1 = tree_schedstat(pids)
        run.cpu_s = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
        if target.name == "trio" and loop0 and loop1:
            run.loop_cpu_s, run.loop_wait_s = loop1[0] - loop0[0], loop1[1] - loop0[1]
        if target.name == "trio":  # a fresh process per run: its peak is this run's
            peaks = [proc_status(pid).get("VmHWM") for pid in pids]
            run.peak_rss_kib = sum(p for p in peaks if p is not None) or None
    run.client_s, run.delivered_s, run.delivered_files = client_s, delivered_s, seen
    problems = []
    if kind == "loadgen":
        line = next((ln for ln in reversed(output.splitlines()) if ln.startswith("{")), "")
        try:
            run.loadgen = json.loads(line)
        except ValueError:
            problems.append(f"loadgen printed no result: {output.strip()[-300:]!r}")
        if run.loadgen.get("errors"):
            problems.append(
                f"{run.loadgen['errors']} transactions failed, "
                f"e.g. {run.loadgen.get('first_errors')}"
            )
    elif output.strip():
        # smtp-source is silent unless a reply was not the expected one
        problems.append("smtp-source: " + " | ".join(output.strip().splitlines()[:3]))
    if rc is None or client_s is None:
        problems.append(f"client still running after {timeout:.0f} s (killed)")
    elif rc != 0:
        problems.append(f"client exit status {rc}")
    if delivered_s is None:
        problems.append(f"{seen}/{messages} files in new/ after {timeout:.0f} s")
    elif kind == "source":
        time.sleep(0.2)
        extra = count_new(target.new_dir) - messages
        if extra > 0:
            problems.append(f"{extra} more files than messages in new/ (left from an earlier run)")
    run.error = "; ".join(problems) or None
    return run


def warm_up(target: Target, sessions: int, timeout: float, workdir: Path) -> None:
    """A few unmeasured messages: first connections, imports, process spawns, caches."""
    clear_maildir(target.maildir)
    count = max(20, WARMUP * sessions)
    drive(
        source_cmd(target, 1024, sessions, count),
        target,
        count,
        min(timeout, 60),
        workdir / "warmup.out",
    )
    clear_maildir(target.maildir)


def describe(run: Run) -> str:
    if run.error:
        return f"ERROR {run.error}"
    if run.kind == "loadgen":
        # its own clock: the process wall time would include interpreter start-up
        g = run.loadgen
        parts = [
            f"loadgen accepted {g.get('accepted_per_s')}/s",
            f"DATA p50 {g.get('p50_ms')} ms p99 {g.get('p99_ms')} ms max {g.get('max_ms')} ms",
        ]
    else:
        parts = [
            f"accepted {fmt(run.accepted_rate, 1)}/s",
            f"delivered {fmt(run.delivered_rate, 1)}/s",
        ]
    if run.peak_rss_kib:
        parts.append(f"peak RSS {run.peak_rss_kib / 1024:.1f} MiB")
    if run.cpu_s is not None:
        parts.append(f"server CPU {1000 * run.cpu_s / run.messages:.2f} ms/msg")
    span = run.delivered_s or run.client_s
    if run.loop_cpu_s is not None and run.loop_wait_s is not None and span:
        parts.append(
            f"event loop on CPU {100 * run.loop_cpu_s / span:.0f}% + waiting for "
            f"a CPU {100 * run.loop_wait_s / span:.0f}%"
        )
    return ", ".join(parts)


def postfix_purge(peer: Peer) -> None:
    """After a failed Postfix run, drop what is still queued so it cannot land in the next one."""
    if shutil.which("postsuper"):
        subprocess.run(["postsuper", "-d", "ALL"], capture_output=True, timeout=60, check=False)
    time.sleep(1)


# ---------------------------------------------------------------- fsync and idle runs


@dataclass
class FsyncResult:
    size: int
    sessions: int
    command: str
    strace: str
    fsync: int = 0
    fdatasync: int = 0
    delivered: int = 0
    error: str | None = None

    @property
    def per_message(self) -> float | None:
        if self.error or not self.delivered:
            return None
        return (self.fsync + self.fdatasync) / self.delivered


def parse_strace_counts(text: str) -> dict[str, int]:
    """Calls per syscall from an ``strace -c`` table (its 4th column)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) >= 5 and tokens[-1] in ("fsync", "fdatasync"):
            with contextlib.suppress(ValueError):
                counts[tokens[-1]] = int(tokens[3])
    return counts


def fsync_run(
    server: TrioServer, size: int, sessions: int, messages: int, timeout: float, workdir: Path
) -> FsyncResult:
    """One smtp-source run with strace counting fsync/fdatasync of every server thread."""
    target = server.start()
    summary = workdir / "strace.txt"
    assert target.pid is not None
    # Every process of the server (a supervisor and each worker), all their threads (-f).
    attach = [arg for pid in process_tree(target.pid) for arg in ("-p", str(pid))]
    strace_cmd = [
        "strace",
        "-f",
        "-c",
        "-q",
        "-e",
        "trace=fsync,fdatasync",
        "-o",
        str(summary),
        *attach,
    ]
    cmd = source_cmd(target, size, sessions, messages)
    res = FsyncResult(size, sessions, shlex.join(cmd), shlex.join(strace_cmd))
    try:
        warm_up(target, sessions, timeout, workdir)
        summary.unlink(missing_ok=True)
        strace = subprocess.Popen(
            strace_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 20
            pids = process_tree(target.pid)
            while not all(map(traced, pids)) and time.monotonic() < deadline:
                if strace.poll() is not None:
                    break
                time.sleep(0.05)
            if not all(map(traced, pids)):
                res.error = "strace did not attach"
            else:
                clear_maildir(target.maildir)
                rc, _, delivered_s, seen, output = drive(
                    cmd, target, messages, timeout, workdir / "client.out"
                )
                res.delivered = seen
                if rc != 0 or output.strip() or delivered_s is None:
                    res.error = (
                        f"run failed: exit {rc}, {seen}/{messages} delivered, "
                        f"{output.strip()[:200]!r}"
                    )
                time.sleep(1.0)  # the queue's delivered-marks and checkpoints of this run
        finally:
            if strace.poll() is None:
                strace.send_signal(signal.SIGINT)
            try:
                _, err = strace.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                strace.kill()
                _, err = strace.communicate(timeout=10)
        try:
            counts = parse_strace_counts(summary.read_text())
        except OSError:
            counts = {}
            res.error = res.error or f"no strace summary: {err.decode(errors='replace')[-300:]}"
        res.fsync, res.fdatasync = counts.get("fsync", 0), counts.get("fdatasync", 0)
    finally:
        server.stop()
    return res


def tls_run(
    server: TrioServer, sessions: int, messages: int, timeout: float, workdir: Path
) -> list[tuple[str, dict[str, object]]]:
    """The TLS column: the same trio_mta, plaintext vs STARTTLS, same sessions, 1 KiB.

    Interleaved per session count so both modes see the same machine noise.
    Returns (command, loadgen JSON) for plaintext, then STARTTLS.
    """
    out = []
    for starttls in (False, True):
        target = server.start()
        try:
            warm_up(target, sessions, timeout, workdir)
            cmd = loadgen_cmd(target, 1024, sessions, messages) + (
                ["--starttls"] if starttls else []
            )
            try:
                res = subprocess.run(
                    cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=timeout
                )
                line = next(
                    (ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("{")), ""
                )
                data: dict[str, object] = (
                    json.loads(line) if line else {"error": (res.stderr or res.stdout)[-300:]}
                )
            except subprocess.TimeoutExpired:
                data = {"error": "loadgen timed out"}
        finally:
            server.stop()
        out.append((shlex.join(cmd), data))
    return out


def idle_run(server: TrioServer, count: int, timeout: float) -> tuple[str, dict[str, object]]:
    target = server.start()
    cmd = [
        sys.executable,
        str(LOADGEN),
        "idle",
        "--port",
        str(target.port),
        "-n",
        str(count),
        "--server-pid",
        str(target.pid),
        "-f",
        SENDER,
        "-t",
        RCPT,
    ]
    try:
        res = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=timeout + count / 50
        )
        line = next((ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("{")), "")
        try:
            data: dict[str, object] = json.loads(line)
        except ValueError:
            data = {"error": (res.stderr or res.stdout).strip()[-300:]}
    except subprocess.TimeoutExpired:
        data = {"error": "loadgen idle timed out"}
    finally:
        server.stop()
    return shlex.join(cmd), data


# ---------------------------------------------------------------- report


def cells(sizes: Sequence[int], sessions: Sequence[int]) -> Iterator[tuple[int, int]]:
    for size in sizes:
        for s in sessions:
            yield size, s


class Results:
    def __init__(self) -> None:
        self.runs: list[Run] = []

    def pick(self, target: str, kind: str, size: int, sessions: int) -> list[Run]:
        return [
            r
            for r in self.runs
            if (r.target, r.kind, r.size, r.sessions) == (target, kind, size, sessions)
        ]

    def med(
        self, target: str, size: int, sessions: int, what: str, kind: str = "source"
    ) -> float | None:
        runs = [r for r in self.pick(target, kind, size, sessions) if not r.error]
        values: list[float | None]
        if what == "accepted":
            values = [r.accepted_rate for r in runs]
        elif what == "delivered":
            values = [r.delivered_rate for r in runs]
        elif what == "rss":
            values = [r.peak_rss_kib / 1024 if r.peak_rss_kib else None for r in runs]
        elif what == "cpu":
            values = [1000 * r.cpu_s / r.messages if r.cpu_s is not None else None for r in runs]
        elif what == "loop_cpu":
            values = [
                1000 * r.loop_cpu_s / r.messages if r.loop_cpu_s is not None else None for r in runs
            ]
        elif what == "loop_busy":
            values = [
                100 * (r.loop_cpu_s + r.loop_wait_s) / r.delivered_s
                if r.loop_cpu_s is not None and r.loop_wait_s is not None and r.delivered_s
                else None
                for r in runs
            ]
        else:  # a loadgen JSON field
            values = [_num(r.loadgen.get(what)) for r in runs]
        return median(values)

    def ok_count(self, target: str, size: int, sessions: int, kind: str = "source") -> str:
        runs = self.pick(target, kind, size, sessions)
        return f"{sum(1 for r in runs if not r.error)}/{len(runs)}"


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    say(line)
    say("-" * len(line))
    for row in rows:
        say("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def report(
    a: argparse.Namespace,
    res: Results,
    fsyncs: list[FsyncResult],
    idle: tuple[str, dict[str, object]] | None,
    targets: list[str],
) -> None:
    say()
    say(
        f"=== Results: medians of {a.repeat} run(s), {a.messages} messages per run, "
        f"one connection per message ==="
    )
    say()
    say("Throughput (msg/s). accepted = M / smtp-source wall time (every DATA got 250);")
    say("delivered = M / time from start until M files sit in the Maildir's new/.")
    say("CPU ms/msg = the server process's user+sys CPU over the run / M (not for Postfix).")
    rows = []
    for size, s in cells(a.sizes, a.sessions):
        for t in targets:
            rows.append(
                [
                    size_label(size),
                    str(s),
                    LABEL[t],
                    fmt(res.med(t, size, s, "accepted"), 1),
                    fmt(res.med(t, size, s, "delivered"), 1),
                    fmt(res.med(t, size, s, "cpu"), 2),
                    res.ok_count(t, size, s),
                ]
            )
    table(
        rows, ["size", "sessions", "server", "accepted/s", "delivered/s", "CPU ms/msg", "runs ok"]
    )

    if "trio" in targets:
        say()
        say("trio_mta detail: DATA-reply latency from bench/loadgen.py (same sessions and M),")
        say("peak RSS (VmHWM) and server CPU per message during the smtp-source run;")
        say("loop = the event-loop thread alone: its CPU per message, and the share of the run")
        say("it spent on a CPU or runnable waiting for one (100% = the loop is the bottleneck).")
        rows = []
        for size, s in cells(a.sizes, a.sessions):
            rows.append(
                [
                    size_label(size),
                    str(s),
                    fmt(res.med("trio", size, s, "p50_ms", "loadgen"), 2),
                    fmt(res.med("trio", size, s, "p99_ms", "loadgen"), 2),
                    fmt(res.med("trio", size, s, "accepted_per_s", "loadgen"), 1),
                    fmt(res.med("trio", size, s, "rss"), 1),
                    fmt(res.med("trio", size, s, "cpu"), 2),
                    fmt(res.med("trio", size, s, "loop_cpu"), 2),
                    fmt(res.med("trio", size, s, "loop_busy"), 0),
                    res.ok_count("trio", size, s, "loadgen"),
                ]
            )
        table(
            rows,
            [
                "size",
                "sessions",
                "p50 ms",
                "p99 ms",
                "loadgen acc/s",
                "peak RSS MiB",
                "CPU ms/msg",
                "loop ms/msg",
                "loop busy %",
                "loadgen ok",
            ],
        )

    peers = [t for t in ("postfix", "aiosmtpd") if t in targets]
    if "trio" in targets and peers:
        say()
        say("Ratios trio_mta / peer (medians):")
        rows = []
        header = ["size", "sessions"]
        for p in peers:
            header += [f"acc /{LABEL[p]}", f"del /{LABEL[p]}"]
        for size, s in cells(a.sizes, a.sessions):
            row = [size_label(size), str(s)]
            for p in peers:
                row.append(
                    ratio(res.med("trio", size, s, "accepted"), res.med(p, size, s, "accepted"))
                )
                row.append(
                    ratio(res.med("trio", size, s, "delivered"), res.med(p, size, s, "delivered"))
                )
            rows.append(row)
        table(rows, header)

    if fsyncs:
        say()
        say(
            "fsync calls per delivered message (trio_mta; a separate run under strace, "
            "whose speed is not reported):"
        )
        rows = [
            [
                size_label(f.size),
                str(f.sessions),
                str(f.fsync),
                str(f.fdatasync),
                str(f.delivered),
                fmt(f.per_message, 3),
                f.error or "",
            ]
            for f in fsyncs
        ]
        table(rows, ["size", "sessions", "fsync", "fdatasync", "delivered", "per message", "error"])
        for f in fsyncs:
            say(f"  {f.strace}  during  {f.command}")

    if idle is not None:
        cmd, data = idle
        say()
        say("Idle connections (trio_mta):")
        say(f"  command: {cmd}")
        for key in (
            "requested",
            "opened",
            "open_errors",
            "open_s",
            "new_client",
            "new_client_s",
            "idle_alive_sample",
            "server_rss_before_kib",
            "server_rss_kib",
            "server_hwm_kib",
            "first_errors",
            "error",
        ):
            if key in data:
                value = data[key]
                if key.endswith("_kib") and isinstance(value, int):
                    value = f"{value} KiB ({value / 1024:.1f} MiB)"
                say(f"  {key}: {value}")
    goals(a, res, fsyncs, idle, targets)


def goals(
    a: argparse.Namespace,
    res: Results,
    fsyncs: list[FsyncResult],
    idle: tuple[str, dict[str, object]] | None,
    targets: list[str],
) -> None:
    """The issue's goals, judged from this run's figures (informational only)."""
    say()
    say("Goals (issue 3), judged from this run:")

    def show(name: str, value: float | None, limit: float, op: str, unit: str = "") -> None:
        if value is None:
            verdict, shown = "n/a", "-"
        else:
            met = {">=": value >= limit, "<": value < limit, "<=": value <= limit}[op]
            verdict, shown = ("met" if met else "MISSED"), f"{value:.2f}{unit}"
        say(f"  {verdict:6} {name}: {shown} (goal {op} {limit:g}{unit})")

    def rel(size: int, s: int, what: str) -> float | None:
        t, p = res.med("trio", size, s, what), res.med("postfix", size, s, what)
        return t / p if t is not None and p else None

    if "trio" in targets and "postfix" in targets:
        for size, want in ((1024, 2.0), (65536, 1.5)):
            for s in (10, 50):
                if size in a.sizes and s in a.sessions:
                    show(
                        f"delivered {size_label(size)} s={s} trio/Postfix",
                        rel(size, s, "delivered"),
                        want,
                        ">=",
                        "x",
                    )
        if 1024 in a.sizes and 50 in a.sessions:
            show("accepted 1 KiB s=50 trio/Postfix", rel(1024, 50, "accepted"), 3.0, ">=", "x")
    for f in fsyncs:
        show(
            f"fsync per delivered message {size_label(f.size)} s={f.sessions}",
            f.per_message,
            1.5,
            "<",
        )
    if "trio" in targets:
        top = max(a.sessions)
        for size in a.sizes:
            show(
                f"peak RSS {size_label(size)} s={top}",
                res.med("trio", size, top, "rss"),
                64,
                "<=",
                " MiB",
            )
    if idle is not None:
        data = idle[1]
        rss = data.get("server_rss_kib")
        ok = data.get("new_client") == "ok"
        say(
            f"  {'met' if ok else 'MISSED':6} new client served with {data.get('opened')} idle "
            f"connections open: {data.get('new_client')}"
        )
        show(
            "RSS with idle connections",
            rss / 1024 if isinstance(rss, int) else None,
            300,
            "<",
            " MiB",
        )


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="trio_mta inbound benchmark against Postfix and aiosmtpd (see bench/README.md)"
    )
    ap.add_argument("-m", "--messages", type=int, help="messages per run (default 2000, quick 300)")
    ap.add_argument(
        "-R", "--repeat", type=int, help="runs per cell, medians reported (default 3, quick 1)"
    )
    ap.add_argument(
        "--sizes", help="message sizes in bytes, comma-separated (default 1024,65536; quick 1024)"
    )
    ap.add_argument(
        "--sessions", help="session counts, comma-separated (default 1,10,50; quick 10,50)"
    )
    ap.add_argument(
        "--only", action="append", choices=TARGETS, help="benchmark only this server (repeatable)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: -m 300, R=1, fewer cells, 2000 idle connections",
    )
    ap.add_argument(
        "--peers",
        type=Path,
        default=DEFAULT_PEERS,
        help=f"folder with postfix.sh and aiosmtpd.sh (default {DEFAULT_PEERS})",
    )
    ap.add_argument("--port", type=int, default=2603, help="trio_mta's port (default 2603)")
    ap.add_argument(
        "--idle", type=int, help="idle connections to open (default 10000, quick 2000, 0 skips)"
    )
    ap.add_argument("--no-fsync", action="store_true", help="skip the strace fsync runs")
    ap.add_argument("--no-latency", action="store_true", help="skip the loadgen latency runs")
    ap.add_argument("--no-tls", action="store_true", help="skip the STARTTLS column")
    ap.add_argument(
        "--tls-sessions",
        default="10,50",
        help="session counts for the STARTTLS column (default 10,50)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds one run may take before it is stopped and reported (default 300)",
    )
    ap.add_argument("--log-level", default="warning", help="trio_mta's log level (default warning)")
    ap.add_argument(
        "--milter",
        help="a milter for trio_mta, e.g. 127.0.0.1:11332 (rspamd): "
        "every message passes through it ([[milter]] in its config)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder (server logs)")
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="trio_mta's [server] workers (default 0: one per core, the product's "
        "default; 1 = one process); CPU, "
        "RSS and loop figures then sum the supervisor and every worker",
    )
    ap.add_argument(
        "--dkim",
        choices=["ed25519", "rsa"],
        action="append",
        help="only the mail authentication column: delivered msg/s without and "
        "with DKIM signing by this key type (repeatable; bench/mailauth.py)",
    )
    ap.add_argument(
        "--verify",
        action="store_true",
        help="only the mail authentication column: without and with SPF, DKIM "
        "and DMARC verification of DKIM-signed inbound mail",
    )
    ap.add_argument(
        "--rspamd",
        action="store_true",
        help="only the milter column: without and with a private rspamd as "
        "[[milter]] (production-like: hyperscan, one proxy per core; "
        "reuse_connections = true, as docs/milters.md configures it; bench/mailauth.py)",
    )
    ap.add_argument(
        "--rspamd-fresh",
        action="store_true",
        help="the milter column with reuse_connections = false: a new rspamd "
        "connection for every SMTP session",
    )
    a = ap.parse_args(argv)
    q = a.quick
    a.messages = a.messages or (300 if q else 2000)
    a.repeat = a.repeat or (1 if q else 3)
    a.sizes = _ints(a.sizes or ("1024" if q else "1024,65536"), ap, "--sizes")
    a.sessions = _ints(a.sessions or ("10,50" if q else "1,10,50"), ap, "--sessions")
    a.tls_sessions = _ints(a.tls_sessions, ap, "--tls-sessions")
    a.idle = a.idle if a.idle is not None else (2000 if q else 10000)
    a.only = list(dict.fromkeys(a.only)) if a.only else list(TARGETS)
    if a.messages < 1 or a.repeat < 1:
        ap.error("--messages and --repeat must be positive")
    return a


def _ints(text: str, ap: argparse.ArgumentParser, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"{name}: comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        ap.error(f"{name}: positive integers, got {text!r}")
    return values


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    say(
        f"# trio_mta inbound benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
        f"cpus={os.cpu_count()}  python={sys.version.split()[0]}"
    )
    say(f"# argv: {shlex.join([sys.executable, *sys.argv])}")
    say(
        f"# messages={a.messages} repeat={a.repeat} sizes={a.sizes} sessions={a.sessions} "
        f"servers={a.only} idle={a.idle}"
    )
    say(
        "# smtp-source: one connection per message (no -d), no pipelining; "
        "unmeasured warm-up (1 KiB, max(20, 2 x sessions) messages) for each trio_mta process "
        "at the run's session count, for each peer once at the largest"
    )
    if ensure_tool("smtp-source", "postfix") is None:
        say("smtp-source is not available (apt-get install -y postfix failed)")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="trio-mta-bench-"))
    server = TrioServer(workdir, a.port, a.log_level, a.workers, a.milter)
    if a.dkim or a.verify or a.rspamd or a.rspamd_fresh:
        import mailauth  # bench/, the script's own folder, is on sys.path

        try:
            return mailauth.run(a, server, workdir, sys.modules[__name__])
        except SetupError as exc:
            say(f"setup: {exc}")
            return 1
        finally:
            server.stop()
            if not a.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    res = Results()
    fsyncs: list[FsyncResult] = []
    idle: tuple[str, dict[str, object]] | None = None
    peers: list[Peer] = []
    try:
        try:
            peers = make_peers(a.peers, a.only)
        except SetupError as exc:
            say(f"setup: {exc}")
            return 1
        targets = [t for t in a.only]
        for peer in peers:
            error = peer.start()
            if error:
                say(f"# {peer.name} unavailable, skipped: {error}")
                targets.remove(peer.name)
            else:
                warm_up(peer.target(), max(a.sessions), a.timeout, workdir)
        by_name = {p.name: p for p in peers}
        total = a.repeat * len(a.sizes) * len(a.sessions)
        n = 0
        # interleaved: every server sees the same share of the machine's noise
        for rep in range(1, a.repeat + 1):
            for size, s in cells(a.sizes, a.sessions):
                n += 1
                for t in targets:
                    tag = f"[{n}/{total} {LABEL[t]} {size_label(size)} s={s} rep {rep}]"
                    if t == "trio":
                        target = server.start()
                        try:
                            warm_up(target, s, a.timeout, workdir)
                            kinds = ["source"] + ([] if a.no_latency else ["loadgen"])
                            for kind in kinds:
                                run = measure(
                                    target, kind, size, s, rep, a.messages, a.timeout, workdir
                                )
                                res.runs.append(run)
                                say(f"{tag} {run.command}\n    -> {describe(run)}")
                        finally:
                            server.stop()
                    else:
                        run = measure(
                            by_name[t].target(),
                            "source",
                            size,
                            s,
                            rep,
                            a.messages,
                            a.timeout,
                            workdir,
                        )
                        res.runs.append(run)
                        say(f"{tag} {run.command}\n    -> {describe(run)}")
                        if run.error and t == "postfix":
                            postfix_purge(by_name[t])
        if "trio" in targets and not a.no_fsync:
            if ensure_tool("strace", "strace") is None:
                say("# strace unavailable: fsync counts skipped")
            else:
                top = 50 if 50 in a.sessions else max(a.sessions)
                for size in a.sizes:
                    f = fsync_run(server, size, top, a.messages, a.timeout, workdir)
                    fsyncs.append(f)
                    error = f" ERROR {f.error}" if f.error else ""
                    say(
                        f"[fsync {size_label(size)} s={top}] {f.strace} & {f.command}\n"
                        f"    -> fsync {f.fsync}, fdatasync {f.fdatasync}, delivered "
                        f"{f.delivered}, per message {fmt(f.per_message, 3)}{error}"
                    )
        if "trio" in targets and not a.no_tls:
            say(
                "\nTLS column (trio_mta, 1 KiB, bench/loadgen.py; STARTTLS after EHLO, "
                "a full handshake per connection, as between MTAs that meet once):"
            )
            rows = []
            for s in a.tls_sessions:
                (plain_cmd, plain), (tls_cmd, tls) = tls_run(
                    server, s, a.messages, a.timeout, workdir
                )
                say(f"[tls s={s}] {plain_cmd}\n    -> {json.dumps(plain)}")
                say(f"[tls s={s}] {tls_cmd}\n    -> {json.dumps(tls)}")
                p_rate, t_rate = _num(plain.get("accepted_per_s")), _num(tls.get("accepted_per_s"))
                rows.append(
                    [
                        str(s),
                        fmt(p_rate, 1),
                        fmt(t_rate, 1),
                        ratio(t_rate, p_rate),
                        fmt(_num(tls.get("tls_handshake_p50_ms")), 2),
                        fmt(_num(tls.get("p50_ms")), 2),
                    ]
                )
            table(
                rows,
                [
                    "sessions",
                    "plain msg/s",
                    "STARTTLS msg/s",
                    "TLS/plain",
                    "handshake p50 ms",
                    "DATA p50 ms (TLS)",
                ],
            )
        if "trio" in targets and a.idle > 0:
            idle = idle_run(server, a.idle, a.timeout)
            say(f"[idle] {idle[0]}\n    -> {json.dumps(idle[1])}")
        report(a, res, fsyncs, idle, targets)
    except SetupError as exc:
        say(f"setup: {exc}")
        return 1
    except KeyboardInterrupt:
        say("# interrupted")
        return 130
    finally:
        server.stop()
        for peer in peers:
            peer.stop()
        if a.keep:
            say(f"# work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
