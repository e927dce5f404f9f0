"""Outbound benchmark: trio_mta relaying from its queue to a sink, beside Postfix, in one run.

For each sink (Postfix's smtp-sink in plain text; aiosmtpd with STARTTLS and a
trustme certificate) and each number of outbound connections, both MTAs get
the same load the same way: N messages are submitted over SMTP while the sink
is down, so every one is deferred after a refused connection; then the sink
starts, the queue is flushed (`trio-mta queue flush`, `postqueue -f`) and the
sink counts what arrives. Every Message-ID is checked: none lost, none twice.
See bench/README.md.

    python bench/outbound.py --quick       # smoke run, a few minutes
    python bench/outbound.py               # full run: 2 sinks x 1/10/50 connections, R=3

Never fails on timing: it prints what it measured. Exit 1 only when the
benchmark could not be set up (trio_mta or Postfix does not start, no smtp-sink).
Only the standard library is imported at the top: the same file runs the
aiosmtpd sink (``--serve-tls-sink``) under an interpreter that has aiosmtpd.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is this script's folder: the process-tree helpers are inbound.py's.
from inbound import process_tree, tree_schedstat

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
DEFAULT_PEERS = HERE.parents[2] / "shared" / "peers"
HOST = "127.0.0.1"
SENDER = "bench@bench.test"
RCPT_DOMAIN = "sink.test"
MX_NAME = f"mx.{RCPT_DOMAIN}"
GOAL = 1.5  # issue 5: trio_mta relays at least 1.5x Postfix's rate, with connection reuse
SINKS = ("plain", "tls")
SINK_LABEL = {"plain": "smtp-sink", "tls": "aiosmtpd+TLS"}
ROUTES = ("smarthost", "mx")
MTA_LABEL = {
    "trio-smarthost": "trio_mta smarthost",
    "trio-mx": "trio_mta MX",
    "postfix": "Postfix relayhost",
}
POLL = 0.01  # seconds between reads of the sink's counter
LOADERS = 8  # SMTP sessions submitting the load (each sends its share over one connection)


class SetupError(Exception):
    """The benchmark cannot run at all (not a slow MTA: that is a figure)."""


def say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- the TLS sink
# Run as `python bench/outbound.py --serve-tls-sink HOST:PORT --cert C --key K --ids F`.
# Prints "ready", then "conn=C mesg=M\r" after every connection and message; on
# SIGTERM writes the Message-IDs it saw to F, one a line, and exits.


def serve_tls_sink(listen: str, cert: str, key: str, ids_file: str) -> None:
    import asyncio
    import ssl

    from aiosmtpd.smtp import SMTP  # type: ignore[import-not-found,import-untyped,unused-ignore]

    message_id = re.compile(rb"^message-id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
    counts = {"conn": 0, "mesg": 0}
    ids: list[bytes] = []

    def show() -> None:
        sys.stdout.write(f"conn={counts['conn']} mesg={counts['mesg']}\r")
        sys.stdout.flush()

    class Counter:
        async def handle_RCPT(
            self,
            server: object,
            session: object,
            envelope: Any,
            address: str,
            rcpt_options: list[str],
        ) -> str:
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 OK"

        async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
            data = envelope.original_content or b""
            head = data.split(b"\r\n\r\n", 1)[0]
            found = message_id.search(head)
            ids.append(found.group(1) if found else b"(none)")
            counts["mesg"] += 1
            show()
            return "250 2.0.0 OK"

    class CountingSMTP(SMTP):  # type: ignore[misc,unused-ignore]
        def connection_made(self, transport: Any) -> None:
            # After STARTTLS asyncio calls this again with the TLS transport: same session.
            if transport.get_extra_info("sslcontext") is None:
                counts["conn"] += 1
            super().connection_made(transport)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    handler = Counter()
    host, _, port = listen.rpartition(":")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: CountingSMTP(
                handler,
                hostname=MX_NAME,
                ident="aiosmtpd-sink",
                tls_context=context,
                require_starttls=False,
                data_size_limit=36700160,
            ),
            host,
            int(port),
            backlog=1024,
            reuse_address=True,
        )
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print("ready", flush=True)
        async with server:
            await stop.wait()

    asyncio.run(main())
    with open(ids_file, "wb") as f:
        f.write(b"".join(i + b"\n" for i in ids))
    show()


# ---------------------------------------------------------------- helpers


def cpu_split(pid: int, children: bool = False) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a process (all its threads), plus its reaped
    children's if asked."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        user, system = int(fields[11]), int(fields[12])
        if children:
            user += int(fields[13])
            system += int(fields[14])
        tick = os.sysconf("SC_CLK_TCK")
        return user / tick, system / tick
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds(pid: int, children: bool = False) -> float | None:
    split = cpu_split(pid, children)
    return None if split is None else split[0] + split[1]


def schedstat(pid: int, tid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of one thread."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            on_cpu, waiting, _ = f.read().split()
        return int(on_cpu) / 1e9, int(waiting) / 1e9
    except (OSError, ValueError):
        return None


def listening(port: int) -> bool:
    """True when something listens on 127.0.0.1:port, seen in /proc (no probe connection,
    which a sink would count as a session)."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            return any(line.split()[1] == want and line.split()[3] == "0A" for line in f)
    except (OSError, StopIteration, IndexError):
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def established(port: int) -> int | None:
    """TCP connections established to 127.0.0.1:port right now (server side), from ss."""
    try:
        out = subprocess.run(
            ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sum(1 for line in out.splitlines() if line.strip())


class PeakSampler:
    """Samples the sink's established connections a few times a second in a thread."""

    def __init__(self, port: int, interval: float = 0.2) -> None:
        self.port = port
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            n = established(self.port)
            if n is not None:
                self.peak = max(self.peak, n)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    say(line)
    say("-" * len(line))
    for row in rows:
        say("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def domains(count: int) -> list[str]:
    """The recipient domains: sink.test, or d0.sink.test ... when spread over several."""
    return [RCPT_DOMAIN] if count == 1 else [f"d{k}.{RCPT_DOMAIN}" for k in range(count)]


def recipient(i: int, spread: int) -> str:
    names = domains(spread)
    return f"u@{names[i % len(names)]}"


def message(tag: str, i: int, size: int, rcpt: str) -> bytes:
    """One test message of about `size` bytes with a Message-ID unique to (run, i)."""
    head = (
        f"Message-ID: <{tag}.{i}@bench.test>\r\nFrom: <{SENDER}>\r\nTo: <{rcpt}>\r\n"
        f"Subject: outbound bench {tag} {i}\r\n\r\n"
    ).encode()
    line = b"X" * 78 + b"\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines


def expected_ids(tag: str, n: int) -> set[bytes]:
    return {f"<{tag}.{i}@bench.test>".encode() for i in range(n)}


def submit(port: int, tag: str, n: int, size: int, spread: int, timeout: float) -> str | None:
    """Submit n messages to 127.0.0.1:port over LOADERS sessions; an error text or None."""
    errors: list[str] = []

    def worker(start: int) -> None:
        try:
            with smtplib.SMTP(HOST, port, local_hostname="loader.bench.test", timeout=60) as client:
                for i in range(start, n, LOADERS):
                    rcpt = recipient(i, spread)
                    refused = client.sendmail(SENDER, [rcpt], message(tag, i, size, rcpt))
                    if refused:
                        errors.append(f"message {i}: {refused}")
                        return
        except (OSError, smtplib.SMTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=worker, args=(k,), daemon=True) for k in range(min(LOADERS, n))
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        return f"not done after {timeout:.0f}s"  # stopping the MTA ends the stragglers
    return errors[0] if errors else None


class Spy:
    """py-spy recording one process from before the flush to the end.

    Only samples of the thread holding the GIL (``--gil``): Python actually running.
    py-spy's own idle test takes threads waiting in epoll or on the thread cache's
    lock for busy ones here; what runs with the GIL released (system calls, SQLite)
    shows in the per-thread CPU from /proc instead.
    """

    def __init__(self, folder: Path, tag: str, pid: int | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{tag}.txt"
        self.proc: subprocess.Popen[bytes] | None = None
        if pid is None or shutil.which("py-spy") is None:
            return
        self.proc = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(pid),
                "--rate",
                "200",
                "--nonblocking",
                "--gil",
                "--format",
                "raw",
                "-o",
                str(self.path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # attached before the flush

    def stop(self) -> str:
        if self.proc is None:
            return "py-spy unavailable"
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return summarise_profile(self.path)


def _frame(text: str) -> str:
    """`func (/long/path/to/module.py:123)` -> `func (module path from its package)`."""
    func, _, where = text.partition(" (")
    path = where.rstrip(")")
    path = path.rpartition(":")[0] or path
    for prefix in (r"^.*/site-packages/", r"^.*/lib/python3\.\d+/", r"^.*/(?=trio_mta/)"):
        path, found = re.subn(prefix, "", path)
        if found:
            break
    return f"{func} ({path})"


# Where a sampled stack belongs: the first rule that matches one of its frames wins.
CATEGORIES = (
    ("SQLite queue (in worker threads)", ("trio_mta/queue/store.py",)),
    ("logging", ("trio_mta/log.py", "logging/")),
    ("DNS lookups", ("trio_mta/dns.py", "dns/")),
    ("SMTP client (protocol, TLS, socket calls)", ("trio_mta/client/", "trio_mta/smtp/", "ssl.py")),
    ("to_thread hand-offs (trio side)", ("trio/_threads.py", "trio/_core/_thread_cache.py")),
    ("remote agent (routing, pool)", ("trio_mta/delivery/remote.py",)),
    ("scheduler (dispatch, bookkeeping)", ("trio_mta/queue/scheduler.py",)),
    ("trio run loop (scheduling, epoll)", ("trio/",)),
)


def _category(frames: list[str]) -> str:
    for name, markers in CATEGORIES:
        if any(m in f for f in frames for m in markers):
            return name
    return "other"


def summarise_profile(path: Path, top: int = 10) -> str:
    """Self, inclusive and per-category shares of py-spy's raw stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    kinds: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return "no py-spy output"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        kind = _category(frames)
        kinds[kind] = kinds.get(kind, 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
    if not total:
        return "no samples"
    out = [f"py-spy --gil: {total} samples at 200/s holding the GIL ({path})", "  self:"]
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"    {100 * n / total:5.1f}%  {f}")
    out.append("  inclusive (trio_mta frames):")
    entry_points = ("(trio_mta/cli/main.py)", "(trio_mta/__main__.py)")
    ours = [
        (f, n) for f, n in inclusive.items() if "trio_mta/" in f and not f.endswith(entry_points)
    ]
    for f, n in sorted(ours, key=lambda kv: -kv[1])[:top]:
        out.append(f"    {100 * n / total:5.1f}%  {f}")
    out.append("  by category (first match in the stack, in this order):")
    for name, _ in (*CATEGORIES, ("other", ())):
        if kinds.get(name):
            out.append(f"    {100 * kinds[name] / total:5.1f}%  {name}")
    return "\n".join(out)


# ---------------------------------------------------------------- sinks


@dataclass
class SinkResult:
    messages: int = 0
    sessions: int | None = None
    ids: list[bytes] = field(default_factory=list)
    cpu_s: float | None = None


class Sink:
    """A sink process started per run; counts messages and keeps every Message-ID."""

    def __init__(
        self, kind: str, port: int, work: Path, python: str | None, cert: Path, key: Path
    ) -> None:
        self.kind = kind
        self.port = port
        self.work = work
        self.python = python
        self.cert = cert
        self.key = key
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = work / f"sink-{kind}.out"
        self.dumps = work / f"sink-{kind}-dump"
        self.ids_file = work / f"sink-{kind}.ids"
        self.command: list[str] = []

    def start(self) -> None:
        if listening(self.port):
            raise SetupError(f"{HOST}:{self.port} is taken; pick --port-base")
        shutil.rmtree(self.dumps, ignore_errors=True)
        self.ids_file.unlink(missing_ok=True)
        if self.kind == "plain":
            # Like ../shared/peers/smtp_sink.sh (-u nobody, backlog 1024), plus -c for the
            # running counters and -d to keep each message (its Message-ID is checked).
            self.dumps.mkdir(mode=0o777)
            self.dumps.chmod(0o777)
            self.command = [
                "smtp-sink",
                "-c",
                "-u",
                "nobody",
                "-d",
                f"{self.dumps}/m.",
                f"{HOST}:{self.port}",
                "1024",
            ]
        else:
            assert self.python is not None
            self.command = [
                self.python,
                str(HERE),
                "--serve-tls-sink",
                f"{HOST}:{self.port}",
                "--cert",
                str(self.cert),
                "--key",
                str(self.key),
                "--ids",
                str(self.ids_file),
            ]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc
        if not wait_until(lambda: listening(self.port) or proc.poll() is not None, 30):
            self.stop()
            raise SetupError(f"sink {shlex.join(self.command)} does not listen")
        if proc.poll() is not None:
            raise SetupError(f"sink {shlex.join(self.command)} exited: {self.tail()}")

    def tail(self) -> str:
        try:
            return self.out.read_bytes()[-300:].decode(errors="replace")
        except OSError:
            return ""

    def counters(self) -> dict[str, int]:
        """The latest `name=value` counters the sink printed ({} before the first)."""
        try:
            with open(self.out, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 120))
                chunk = f.read()
        except OSError:
            return {}
        records = [r for r in chunk.split(b"\r") if b"mesg=" in r]
        if not records:
            return {}
        return {k.decode(): int(v) for k, v in re.findall(rb"(\w+)=(\d+)", records[-1])}

    def count(self) -> int:
        return self.counters().get("mesg", 0)

    def cpu(self) -> float | None:
        return cpu_seconds(self.proc.pid) if self.proc else None

    def stop(self) -> SinkResult:
        proc, self.proc = self.proc, None
        result = SinkResult()
        if proc is None:
            return result
        result.cpu_s = cpu_seconds(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        last = self.counters()
        result.messages = last.get("mesg", 0)
        # smtp-sink's sess counts ended sessions (the MTA closed them before this);
        # the aiosmtpd sink counts accepted connections.
        result.sessions = last.get("sess" if self.kind == "plain" else "conn")
        result.ids = self._ids()
        return result

    def _ids(self) -> list[bytes]:
        if self.kind == "tls":
            try:
                return self.ids_file.read_bytes().splitlines()
            except OSError:
                return []
        pattern = re.compile(rb"^message-id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
        ids = []
        with os.scandir(self.dumps) as it:
            for entry in it:
                data = Path(entry.path).read_bytes()
                # smtp-sink's own X-* and Received lines, then the message's header
                found = pattern.search(data.split(b"\n\n", 1)[0])
                ids.append(found.group(1) if found else b"(none)")
        return ids


# ---------------------------------------------------------------- the MTAs


class Mta:
    """An MTA under test: started per run, loaded with the sink down, then flushed."""

    name: str
    port: int

    def start(self, sink: str, sink_port: int, connections: int) -> None:
        raise NotImplementedError

    def queued(self) -> tuple[int, int]:
        """(messages queued, of which deferred after an attempt)."""
        raise NotImplementedError

    def flush(self) -> str | None:
        raise NotImplementedError

    def cpu(self) -> float | None:
        split = self.cpu_split()
        return None if split is None else split[0] + split[1]

    def cpu_split(self) -> tuple[float, float] | None:
        raise NotImplementedError

    def pid(self) -> int | None:
        """The one process whose event-loop thread is accounted, if there is one."""
        return None

    def stop(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class TrioMta(Mta):
    """`python -m trio_mta serve` with a fresh state_dir per run.

    Route "smarthost" sends everything to ``[relay] smarthost = 127.0.0.1:PORT``
    (no DNS, only ``[queue] concurrency`` limits connections: what Postfix's
    relayhost does). Route "mx" looks up the MX of sink.test on the bench's
    loopback DNS server and connects to ``[relay] port``; the remote agent then
    also applies its per-destination limit (half of ``concurrency``).
    """

    def __init__(
        self, route: str, root: Path, port: int, dns: tuple[str, int], log_level: str
    ) -> None:
        self.name = f"trio-{route}"
        self.route = route
        self.root = root
        self.port = port
        self.dns = dns
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = root / "trio.toml"
        self.state = root / "trio-state"
        self.log = root / "trio.log"
        self.command = [sys.executable, "-m", "trio_mta", "serve", "--config", str(self.config)]
        self._stores: list[Any] = []

    def write_config(self, sink: str, sink_port: int, connections: int) -> None:
        if self.route == "smarthost":
            tls = "starttls" if sink == "tls" else "none"  # starttls: required, unverified
            relay = f'smarthost = "{HOST}:{sink_port}"\nsmarthost_tls = "{tls}"\n'
        else:
            relay = f'port = {sink_port}\ntls = "opportunistic"\n'
        # [queue] concurrency is per worker (docs/scaling.md): the product's default of one
        # worker per core, each with its share, so that trio_mta opens as many connections
        # in all as Postfix may.
        workers = max(1, min(os.cpu_count() or 1, connections))
        self.config.write_text(
            f'hostname = "bench-trio.localdomain"\n'
            f'state_dir = "{self.state}"\n'
            f'[[listen]]\naddress = "{HOST}:{self.port}"\nmode = "smtp"\n'
            f'[local]\ndomains = ["bench.test"]\n'
            f"[relay]\n{relay}"
            f'[dns]\nnameservers = ["{self.dns[0]}:{self.dns[1]}"]\n'
            f"[server]\nworkers = {workers}\n"
            f"[queue]\nconcurrency = {connections // workers}\n"
            'retry_initial = "1h"\nretry_max = "1h"\n'
            f"[limits]\nmax_connections = 20000\nmax_connections_per_ip = 20000\n"
            f'[log]\nlevel = "{self.log_level}"\nfile = "{self.log}"\n'
        )

    def start(self, sink: str, sink_port: int, connections: int) -> None:
        if listening(self.port):
            raise SetupError(f"{HOST}:{self.port} is taken; pick --port-base")
        for store in self._stores:
            store.close()
        self._stores = []
        shutil.rmtree(self.state, ignore_errors=True)
        self.log.unlink(missing_ok=True)
        self.write_config(sink, sink_port, connections)
        with open(self.root / "trio.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc
        if not wait_until(lambda: listening(self.port) or proc.poll() is not None, 60):
            self.stop()
            raise SetupError(f"trio_mta does not listen on {HOST}:{self.port}")
        if proc.poll() is not None:
            raise SetupError(f"trio_mta exited {proc.returncode}: {self.tail()}")

    def tail(self) -> str:
        text = ""
        for path in (self.root / "trio.stderr", self.log):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")[-600:]
        return text

    def _queues(self) -> list[Any]:
        """Read-only stores of every queue shard (``[server] workers``: one per worker)."""
        from trio_mta.queue.shards import existing_shards
        from trio_mta.queue.store import QueueStore

        shards = existing_shards(self.state)
        if len(self._stores) != len(shards):
            for store in self._stores:
                store.close()
            self._stores = [QueueStore(path, readonly=True) for _index, path in shards]
        return self._stores

    def queued(self) -> tuple[int, int]:
        total = deferred = 0
        for store in self._queues():
            rows = store.list_messages()
            total += len(rows)
            deferred += sum(1 for m in rows if all(r.status == "deferred" for r in m.recipients))
        return total, deferred

    def flush(self) -> str | None:
        done = subprocess.run(
            [sys.executable, "-m", "trio_mta", "queue", "flush", "--config", str(self.config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return None if done.returncode == 0 else (done.stderr or done.stdout)[-300:]

    def cpu_split(self) -> tuple[float, float] | None:
        """User and system CPU of the process and, under ``[server] workers``, every worker."""
        if self.proc is None:
            return None
        splits = [cpu_split(pid) for pid in process_tree(self.proc.pid)]
        if any(split is None for split in splits):
            return None
        return (
            sum(split[0] for split in splits if split is not None),
            sum(split[1] for split in splits if split is not None),
        )

    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def loop_schedstat(self) -> tuple[float, float] | None:
        """The event-loop threads' schedstat: each worker's, else the one process's."""
        return tree_schedstat(process_tree(self.proc.pid)) if self.proc else None

    def stop(self) -> None:
        for store in self._stores:
            store.close()
        self._stores = []
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # QUITs its pooled connections
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def describe(self) -> str:
        return shlex.join(self.command)


class PostfixMta(Mta):
    """A private Postfix instance (tests/postfix_instance.py) with a relayhost.

    ``relayhost = [127.0.0.1]:PORT`` and ``default_transport = smtp``: the next
    hop is an address literal, so Postfix never asks DNS. Connections to it:
    ``smtp_destination_concurrency_limit`` and ``initial_destination_concurrency``
    both set to the run's count (no slow start); connection caching on demand
    (Postfix's default) reuses connections while the destination has a backlog.
    With the TLS sink ``smtp_tls_security_level = encrypt`` (STARTTLS required,
    unverified, like trio_mta's smarthost), a TLS session cache and, unless
    --postfix-tls-reuse no, ``smtp_tls_connection_reuse`` through tlsproxy(8).
    """

    def __init__(self, root: Path, port: int, cert: Path, key: Path, tls_reuse: bool) -> None:
        self.name = "postfix"
        self.root = root
        self.port = port
        self.cert = cert
        self.key = key
        self.tls_reuse = tls_reuse
        self.instance: Any = None
        self.settings: list[str] = []

    def start(self, sink: str, sink_port: int, connections: int) -> None:
        from tests.postfix_instance import PostfixInstance

        if listening(self.port):
            raise SetupError(f"{HOST}:{self.port} is taken; pick --port-base")
        root = Path(tempfile.mkdtemp(prefix="pf-", dir=self.root))
        self.instance = PostfixInstance(
            root=root,
            port=self.port,
            tls_chain=self.cert,
            tls_key=self.key,
            virtual_domain="pf.bench.test",
            mailboxes={"postmaster@pf.bench.test": "postmaster"},
            hostname="bench-postfix.localdomain",
        )
        tls = sink == "tls"
        self.settings = [
            f"relayhost = [{HOST}]:{sink_port}",
            "default_transport = smtp",
            "relay_transport = smtp",
            "transport_maps =",
            f"smtp_destination_concurrency_limit = {connections}",
            f"initial_destination_concurrency = {connections}",
            "smtpd_tls_security_level = none",
            f"smtp_tls_security_level = {'encrypt' if tls else 'none'}",
            "smtp_tls_loglevel = 0",
            "smtp_tls_session_cache_database = btree:$data_directory/smtp_scache",
            f"smtp_tls_connection_reuse = {'yes' if tls and self.tls_reuse else 'no'}",
            # Nothing is retried before the flush: the run decides when delivery starts.
            "queue_run_delay = 1h",
            "minimal_backoff_time = 1h",
            "maximal_backoff_time = 1h",
        ]
        try:
            self.instance.configure()
            self.instance.postconf("-e", *self.settings)
            if tls and self.tls_reuse:
                self.instance.postconf("-M", "tlsproxy/unix=tlsproxy unix - - n - 0 tlsproxy")
            self.instance.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.stop()
            raise SetupError(f"Postfix instance: {exc}") from None

    def _postqueue(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postqueue", "-c", str(self.instance.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def queued(self) -> tuple[int, int]:
        rows = [
            json.loads(line)
            for line in self._postqueue("-j").stdout.splitlines()
            if line.startswith("{")
        ]
        return len(rows), sum(1 for r in rows if r.get("queue_name") == "deferred")

    def flush(self) -> str | None:
        done = self._postqueue("-f")
        return None if done.returncode == 0 else (done.stderr or done.stdout)[-300:]

    def cpu_split(self) -> tuple[float, float] | None:
        """Every process of the instance, plus master's reaped children (smtp(8) exits
        after max_use deliveries, tlsproxy and scache may come and go)."""
        if self.instance is None:
            return None
        master = self.instance.master_pid()
        user = system = 0.0
        for pid in self.instance.processes():
            value = cpu_split(pid, children=pid == master)
            if value is not None:
                user += value[0]
                system += value[1]
        return user, system

    def stop(self) -> None:
        instance, self.instance = self.instance, None
        if instance is not None:
            instance.stop()
            shutil.rmtree(instance.root, ignore_errors=True)

    def describe(self) -> str:
        return "postfix -c <instance> start; " + "; ".join(self.settings[:5]) + " ..."


# ---------------------------------------------------------------- one run


@dataclass
class Run:
    mta: str
    sink: str
    connections: int
    rep: int
    messages: int
    error: str | None = None
    load_s: float | None = None  # submitting N and seeing them all deferred
    flush_to_first_s: float | None = None  # flush command -> first message at the sink
    relay_s: float | None = None  # first message -> last message at the sink
    total_s: float | None = None  # flush command -> last message at the sink
    cpu_s: float | None = None  # the MTA's CPU from flush to the last message
    sys_s: float | None = None  # ... of which in the kernel (loopback TCP is charged here)
    sink_cpu_s: float | None = None
    dns_cpu_s: float | None = None  # the loopback DNS server's CPU over the same interval
    loop_cpu_s: float | None = None  # trio_mta's event-loop (main) thread: on a CPU ...
    loop_wait_s: float | None = None  # ... and runnable, waiting for a CPU
    profile: str | None = None  # py-spy summary (--py-spy)
    received: int = 0
    unique: int = 0
    lost: int = 0
    duplicates: int = 0
    unknown: int = 0
    sessions: int | None = None
    peak_connections: int | None = None
    left_in_queue: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def rate(self) -> float | None:
        """Messages per second between the first and the last arrival at the sink."""
        if not self.ok or not self.relay_s or self.messages < 2:
            return None
        return (self.messages - 1) / self.relay_s

    @property
    def rate_from_flush(self) -> float | None:
        return self.messages / self.total_s if self.ok and self.total_s else None

    @property
    def cpu_ms(self) -> float | None:
        return self.cpu_s * 1000 / self.messages if self.cpu_s is not None and self.ok else None

    @property
    def sys_share(self) -> float | None:
        if self.sys_s is None or not self.cpu_s or not self.ok:
            return None
        return 100 * self.sys_s / self.cpu_s

    @property
    def loop_ms(self) -> float | None:
        if self.loop_cpu_s is None or not self.ok:
            return None
        return self.loop_cpu_s * 1000 / self.messages

    @property
    def loop_busy(self) -> float | None:
        """Share of flush..last the event-loop thread was on a CPU or waiting for one."""
        if self.loop_cpu_s is None or self.loop_wait_s is None or not self.total_s or not self.ok:
            return None
        return 100 * (self.loop_cpu_s + self.loop_wait_s) / self.total_s

    @property
    def sink_busy(self) -> float | None:
        if self.sink_cpu_s is None or not self.total_s or not self.ok:
            return None
        return 100 * self.sink_cpu_s / self.total_s


def measure(
    mta: Mta,
    sink: Sink,
    connections: int,
    rep: int,
    n: int,
    size: int,
    spread: int,
    timeout: float,
    dns: DnsProcess,
    spy_dir: Path | None,
) -> Run:
    """Load the MTA with the sink down, start the sink, flush, count until all arrived."""
    run = Run(mta.name, sink.kind, connections, rep, n)
    tag = f"r{rep}-{sink.kind}-c{connections}-{mta.name}-{os.getpid()}"
    try:
        mta.start(sink.kind, sink.port, connections)
        t0 = time.monotonic()
        error = submit(mta.port, tag, n, size, spread, timeout)
        if error:
            run.error = f"submission: {error}"
            return run
        if not wait_until(lambda: mta.queued() == (n, n), timeout, step=0.25):
            run.error = f"load: queued/deferred {mta.queued()} after {timeout:.0f}s, want {n}"
            return run
        run.load_s = time.monotonic() - t0
        sink.start()
        spy = Spy(spy_dir, tag, mta.pid()) if spy_dir and isinstance(mta, TrioMta) else None
        with PeakSampler(sink.port) as sampler:
            cpu0, sink0, dns0 = mta.cpu_split(), sink.cpu(), dns.cpu()
            loop0 = mta.loop_schedstat() if isinstance(mta, TrioMta) else None
            t_flush = time.monotonic()
            error = mta.flush()
            if error:
                run.error = f"flush: {error}"
                return run
            first = last = None
            deadline = t_flush + timeout
            count = 0
            while time.monotonic() < deadline:
                count = sink.count()
                now = time.monotonic()
                if count and first is None:
                    first = now
                if count >= n:
                    last = now
                    break
                time.sleep(POLL)
            cpu1, sink1, dns1 = mta.cpu_split(), sink.cpu(), dns.cpu()
            loop1 = mta.loop_schedstat() if isinstance(mta, TrioMta) else None
        if spy is not None:
            run.profile = spy.stop()
        run.peak_connections = sampler.peak
        if cpu0 is not None and cpu1 is not None:
            run.cpu_s = sum(cpu1) - sum(cpu0)
            run.sys_s = cpu1[1] - cpu0[1]
        if sink0 is not None and sink1 is not None:
            run.sink_cpu_s = sink1 - sink0
        if dns0 is not None and dns1 is not None:
            run.dns_cpu_s = dns1 - dns0
        if loop0 is not None and loop1 is not None:
            run.loop_cpu_s = loop1[0] - loop0[0]
            run.loop_wait_s = loop1[1] - loop0[1]
        if first is not None:
            run.flush_to_first_s = first - t_flush
        if last is None or first is None:
            run.error = f"timeout: the sink had {count} of {n} after {timeout:.0f}s"
        else:
            run.relay_s = last - first
            run.total_s = last - t_flush
        # The MTA records its deliveries just after the sink's 250: let it settle.
        wait_until(lambda: mta.queued()[0] == 0, 30, step=0.1)
        run.left_in_queue = mta.queued()[0]
    except SetupError as exc:
        run.error = f"setup: {exc}"
    finally:
        mta.stop()  # closes its connections, so the sink counts them as ended sessions
        time.sleep(0.3)
        result = sink.stop()
        check(run, result, expected_ids(tag, n))
    return run


def check(run: Run, result: SinkResult, expected: set[bytes]) -> None:
    """Every message once: lost, duplicated and unknown Message-IDs at the sink."""
    run.received = len(result.ids)
    seen = set(result.ids)
    run.unique = len(seen & expected)
    run.lost = len(expected - seen)
    run.duplicates = len(result.ids) - len(seen)
    run.unknown = len(seen - expected)
    run.sessions = result.sessions
    if run.error is None and (run.lost or run.duplicates or run.unknown):
        run.error = (
            f"sink saw {run.received} messages: {run.lost} lost, "
            f"{run.duplicates} duplicated, {run.unknown} unknown"
        )
    if run.error is None and run.left_in_queue:
        run.error = f"{run.left_in_queue} messages still queued after all arrived"


def describe(run: Run) -> str:
    if run.relay_s is None:
        timing = "-"
    else:
        timing = (
            f"{fmt(run.rate, 1)} msg/s first->last ({run.relay_s:.2f}s), "
            f"{fmt(run.rate_from_flush, 1)} from flush (first after "
            f"{fmt(run.flush_to_first_s, 2)}s)"
        )
    parts = [
        timing,
        f"CPU {fmt(run.cpu_ms, 2)} ms/msg ({fmt(run.sys_share)}% sys)",
        f"sink: {run.received} msgs, {run.unique} unique, lost {run.lost}, "
        f"dup {run.duplicates}, sessions {fmt(run.sessions)}, "
        f"peak conns {fmt(run.peak_connections)}, busy {fmt(run.sink_busy)}%",
        f"load {fmt(run.load_s, 1)}s",
    ]
    if run.loop_cpu_s is not None:
        parts.insert(2, f"event loop {fmt(run.loop_ms, 2)} ms/msg, busy {fmt(run.loop_busy)}%")
    if run.dns_cpu_s:
        parts.insert(2, f"DNS server CPU {run.dns_cpu_s * 1000 / run.messages:.2f} ms/msg")
    if run.error:
        parts.append(f"ERROR {run.error}")
    text = "; ".join(parts)
    return text + ("\n" + run.profile if run.profile else "")


# ---------------------------------------------------------------- report


@dataclass
class Results:
    runs: list[Run] = field(default_factory=list)

    def pick(self, mta: str, sink: str, connections: int) -> list[Run]:
        return [r for r in self.runs if (r.mta, r.sink, r.connections) == (mta, sink, connections)]

    def med(self, mta: str, sink: str, connections: int, what: str) -> float | None:
        runs = [r for r in self.pick(mta, sink, connections) if r.ok]
        values: list[float | None] = []
        for r in runs:
            if what == "sessions":
                values.append(float(r.sessions) if r.sessions is not None else None)
            elif what == "per_session":
                values.append(r.messages / r.sessions if r.sessions else None)
            elif what == "peak":
                values.append(float(r.peak_connections) if r.peak_connections is not None else None)
            else:
                values.append(getattr(r, what))
        return median(values)

    def ok_count(self, mta: str, sink: str, connections: int) -> str:
        runs = self.pick(mta, sink, connections)
        return f"{sum(1 for r in runs if r.ok)}/{len(runs)}"

    def integrity(self, mta: str) -> tuple[int, int, int, int]:
        runs = [r for r in self.runs if r.mta == mta]
        return (
            sum(r.received for r in runs),
            sum(r.lost for r in runs),
            sum(r.duplicates for r in runs),
            sum(r.unknown for r in runs),
        )


def report(a: argparse.Namespace, res: Results, mtas: list[str]) -> None:
    say()
    say(
        f"=== Results: medians of {a.repeat} run(s), {a.messages} messages of "
        f"{a.size} bytes per run ==="
    )
    say()
    say("msg/s = (N-1) / time from the first to the last message arriving at the sink;")
    say("from flush = N / time from the flush command to the last message (includes the")
    say("MTA noticing the flush). CPU ms/msg = the MTA's user+sys CPU from flush to the")
    say("last message / N (trio_mta: its one process; Postfix: all its processes); sys % =")
    say("the kernel's part (loopback TCP for both ends is mostly charged to the sender).")
    say("loop = trio_mta's event-loop thread alone: its CPU per message, and the share of")
    say("flush..last it was on a CPU or runnable (near 100%: the loop is the bottleneck;")
    say("the rest of the process CPU is worker threads, SQLite). msg/sess = messages per")
    say("SMTP session at the sink (connection reuse); peak = most connections open at once,")
    say("sampled with ss every 0.2 s; sink % = the sink process's CPU / wall.")
    rows = []
    for sink in a.sinks:
        for c in a.connections:
            for m in mtas:
                rows.append(
                    [
                        SINK_LABEL[sink],
                        str(c),
                        MTA_LABEL[m],
                        fmt(res.med(m, sink, c, "rate"), 1),
                        fmt(res.med(m, sink, c, "rate_from_flush"), 1),
                        fmt(res.med(m, sink, c, "cpu_ms"), 2),
                        fmt(res.med(m, sink, c, "sys_share")),
                        fmt(res.med(m, sink, c, "loop_ms"), 2),
                        fmt(res.med(m, sink, c, "loop_busy")),
                        fmt(res.med(m, sink, c, "per_session"), 1),
                        fmt(res.med(m, sink, c, "peak")),
                        fmt(res.med(m, sink, c, "sink_busy")),
                        res.ok_count(m, sink, c),
                    ]
                )
    table(
        rows,
        [
            "sink",
            "conns",
            "MTA",
            "msg/s",
            "from flush",
            "CPU ms/msg",
            "sys %",
            "loop ms/msg",
            "loop %",
            "msg/sess",
            "peak",
            "sink %",
            "runs ok",
        ],
    )

    trios = [m for m in mtas if m.startswith("trio")]
    if "postfix" in mtas and trios:
        say()
        say("Ratios trio_mta / Postfix (medians of msg/s, first to last message):")
        rows = []
        for sink in a.sinks:
            for c in a.connections:
                rows.append(
                    [SINK_LABEL[sink], str(c)]
                    + [
                        ratio(res.med(m, sink, c, "rate"), res.med("postfix", sink, c, "rate"))
                        for m in trios
                    ]
                )
        table(rows, ["sink", "conns"] + [f"{MTA_LABEL[m]} / Postfix" for m in trios])

    say()
    say("Integrity over all runs (every Message-ID submitted must arrive exactly once):")
    for m in mtas:
        received, lost, dup, unknown = res.integrity(m)
        say(
            f"  {MTA_LABEL[m]}: {received} received, {lost} lost, {dup} duplicated, "
            f"{unknown} unknown"
        )

    say()
    say(
        f"Goal (issue 5): trio_mta >= {GOAL}x Postfix's relay rate with connection reuse, "
        "nothing lost or duplicated; judged from this run (informational):"
    )
    for m in trios:
        for sink in a.sinks:
            for c in a.connections:
                t, p = res.med(m, sink, c, "rate"), res.med("postfix", sink, c, "rate")
                if t is None or not p:
                    verdict, shown = "n/a", "-"
                else:
                    verdict = "met" if t / p >= GOAL else "MISSED"
                    shown = f"{t / p:.2f}x"
                say(f"  {verdict:6} {MTA_LABEL[m]} {SINK_LABEL[sink]} conns={c}: {shown}")
        received, lost, dup, unknown = res.integrity(m)
        intact = lost == dup == unknown == 0 and received > 0
        say(f"  {'met' if intact else 'MISSED':6} {MTA_LABEL[m]}: no message lost or duplicated")


# ---------------------------------------------------------------- setup


def tls_files(work: Path) -> tuple[Path, Path]:
    """A trustme CA's certificate for the sinks (and Postfix's unused smtpd TLS)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(MX_NAME, HOST)
    chain, key = work / "sink-chain.pem", work / "sink-key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    for path in (chain, key):
        path.chmod(0o644)  # Postfix's smtpd reads them as its own user
    return chain, key


def has_aiosmtpd(python: str) -> bool:
    try:
        return (
            subprocess.run(
                [python, "-c", "import aiosmtpd"], capture_output=True, timeout=60, check=False
            ).returncode
            == 0
        )
    except OSError:
        return False


def find_aiosmtpd_python(explicit: str | None, peers: Path) -> str | None:
    """This interpreter when it has aiosmtpd, else the peers' venv (installed on demand)."""
    if explicit:
        return explicit if has_aiosmtpd(explicit) else None
    if has_aiosmtpd(sys.executable):
        return sys.executable
    work = Path(
        os.environ.get("PEERS_DIR") or Path(os.environ.get("TMPDIR") or "/tmp") / "trio-mta-peers"
    )
    venv = str(work / "venv" / "bin" / "python")
    if not has_aiosmtpd(venv):
        script = peers / "aiosmtpd.sh"
        if script.is_file():
            say(f"# installing aiosmtpd: bash {script} install")
            subprocess.run(
                ["bash", str(script), "install"],
                env=dict(os.environ, PEERS_DIR=str(work)),
                check=False,
                timeout=900,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
    return venv if has_aiosmtpd(venv) else None


def serve_dns(spread: int) -> None:
    """The tests' loopback DNS server (each recipient domain MX -> mx.sink.test A 127.0.0.1)
    in this process until SIGTERM; prints "ready HOST PORT"."""
    sys.path.insert(0, str(REPO))
    from tests.dnsserver import DnsServer

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    zone: dict[str, list[tuple[str, str]]] = {f"{MX_NAME}.": [("A", HOST)]}
    for name in domains(spread):
        zone[f"{name}."] = [("MX", f"10 {MX_NAME}.")]
    with DnsServer(zone) as server:
        print(f"ready {server.address[0]} {server.address[1]}", flush=True)
        stop.wait()
    print(f"queries {len(server.queries)}", flush=True)


class DnsProcess:
    """serve_dns() in its own process: its CPU is its own, apart from the bench's."""

    def __init__(self, work: Path, spread: int) -> None:
        self.command = [sys.executable, str(HERE), "--serve-dns", "--domains", str(spread)]
        self.out = work / "dns.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = (HOST, 0)

    def __enter__(self) -> DnsProcess:
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        proc = self.proc

        def ready() -> bool:
            return self.out.read_bytes().startswith(b"ready ") or proc.poll() is not None

        if not wait_until(ready, 30) or proc.poll() is not None:
            self.__exit__()
            raise SetupError(f"DNS server did not start: {self.out.read_text()[-300:]}")
        _, host, port = self.out.read_text().split()[:3]
        self.address = (host, int(port))
        return self

    def cpu(self) -> float | None:
        return cpu_seconds(self.proc.pid) if self.proc else None

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="trio_mta outbound (relay) benchmark against Postfix (see bench/README.md)"
    )
    ap.add_argument("-m", "--messages", type=int, help="messages per run (default 2000, quick 500)")
    ap.add_argument(
        "-R", "--repeat", type=int, help="runs per cell, medians reported (default 3, quick 1)"
    )
    ap.add_argument(
        "--connections", help="outbound connection counts, comma-separated (default 1,10,50)"
    )
    ap.add_argument("--sinks", help="plain,tls (default both)")
    ap.add_argument(
        "--routes", help="trio_mta routes: smarthost,mx (default both, quick smarthost)"
    )
    ap.add_argument(
        "--only",
        action="append",
        choices=("trio", "postfix"),
        help="benchmark only this MTA (repeatable)",
    )
    ap.add_argument("-l", "--size", type=int, default=1024, help="message size (default 1024)")
    ap.add_argument(
        "--domains",
        type=int,
        default=1,
        help="spread the recipients over this many domains, all routed to the "
        "sink (default 1: one destination, like a relayhost)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: -m 500, R=1, smarthost")
    ap.add_argument(
        "--timeout",
        type=float,
        help="seconds for loading and for relaying, each, "
        "before a run is stopped and reported (default 300, quick 120)",
    )
    ap.add_argument(
        "--port-base",
        type=int,
        default=2620,
        help="smtp-sink, TLS sink, trio_mta, Postfix on this port and the three "
        "after it (default 2620)",
    )
    ap.add_argument(
        "--postfix-tls-reuse",
        choices=("yes", "no"),
        default="yes",
        help="smtp_tls_connection_reuse for Postfix with the TLS sink (default yes)",
    )
    ap.add_argument(
        "--log-level",
        default="info",
        help="trio_mta's log level, to a file (default info: Postfix logs every delivery too)",
    )
    ap.add_argument("--aiosmtpd-python", help="interpreter for the TLS sink (needs aiosmtpd)")
    ap.add_argument(
        "--peers",
        type=Path,
        default=DEFAULT_PEERS,
        help=f"folder with aiosmtpd.sh (default {DEFAULT_PEERS})",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    ap.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record each trio_mta run with py-spy (raw stacks into DIR) and "
        "print where its CPU went; the sampling costs CPU, so compare such runs "
        "only with each other",
    )
    ap.add_argument("--serve-tls-sink", metavar="HOST:PORT", help=argparse.SUPPRESS)
    ap.add_argument("--serve-dns", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cert", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve_tls_sink or a.serve_dns:
        return a
    q = a.quick
    a.messages = a.messages or (500 if q else 2000)
    a.repeat = a.repeat or (1 if q else 3)
    a.timeout = a.timeout or (120.0 if q else 300.0)
    a.connections = _ints(a.connections or "1,10,50", ap, "--connections")
    a.sinks = _names(a.sinks or ",".join(SINKS), SINKS, ap, "--sinks")
    a.routes = _names(a.routes or ("smarthost" if q else ",".join(ROUTES)), ROUTES, ap, "--routes")
    a.only = list(dict.fromkeys(a.only)) if a.only else ["trio", "postfix"]
    if a.messages < 2 or a.repeat < 1 or a.domains < 1:
        ap.error("--messages must be at least 2, --repeat and --domains positive")
    return a


def _ints(text: str, ap: argparse.ArgumentParser, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"{name}: comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        ap.error(f"{name}: positive integers, got {text!r}")
    return values


def _names(text: str, allowed: Sequence[str], ap: argparse.ArgumentParser, name: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values or any(v not in allowed for v in values):
        ap.error(f"{name}: a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return list(dict.fromkeys(values))


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.serve_tls_sink:
        serve_tls_sink(a.serve_tls_sink, a.cert, a.key, a.ids)
        return 0
    if a.serve_dns:
        serve_dns(a.domains)
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    say(
        f"# trio_mta outbound benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
        f"cpus={os.cpu_count()}  python={sys.version.split()[0]}"
    )
    say(f"# argv: {shlex.join([sys.executable, *sys.argv])}")
    mtas = ([f"trio-{r}" for r in a.routes] if "trio" in a.only else []) + (
        ["postfix"] if "postfix" in a.only else []
    )
    say(
        f"# messages={a.messages} size={a.size} domains={a.domains} repeat={a.repeat} "
        f"connections={a.connections} "
        f"sinks={a.sinks} mtas={mtas} log-level={a.log_level} "
        f"postfix-tls-reuse={a.postfix_tls_reuse}"
    )
    if "plain" in a.sinks and shutil.which("smtp-sink") is None:
        say("setup: smtp-sink is not installed (apt-get install postfix)")
        return 1
    sys.path.insert(0, str(REPO))
    if "postfix" in mtas:
        from tests.postfix_instance import unavailable

        why = unavailable()
        if why:
            say(f"setup: {why}")
            return 1
    python = None
    if "tls" in a.sinks:
        python = find_aiosmtpd_python(a.aiosmtpd_python, a.peers)
        if python is None:
            say("setup: no interpreter with aiosmtpd for the TLS sink (--aiosmtpd-python)")
            return 1
        say(f"# TLS sink: aiosmtpd under {python}")
    work = Path(tempfile.mkdtemp(prefix="trio-mta-outbound-"))
    work.chmod(0o755)  # smtp-sink (as nobody) and Postfix's users reach their folders
    base = a.port_base
    res = Results()
    try:
        cert, key = tls_files(work)
        with DnsProcess(work, a.domains) as dns:
            say(
                f"# DNS: {shlex.join(dns.command)}: tests.dnsserver.DnsServer on "
                f"{dns.address[0]}:{dns.address[1]} ({','.join(domains(a.domains))} MX 10 "
                f"{MX_NAME}, {MX_NAME} A {HOST})"
            )
            sinks = {
                "plain": Sink("plain", base, work, python, cert, key),
                "tls": Sink("tls", base + 1, work, python, cert, key),
            }
            agents: dict[str, Mta] = {
                f"trio-{r}": TrioMta(r, work, base + 2, dns.address, a.log_level) for r in a.routes
            }
            agents["postfix"] = PostfixMta(work, base + 3, cert, key, a.postfix_tls_reuse == "yes")
            for name in mtas:
                say(f"# {MTA_LABEL[name]}: {agents[name].describe()}")
            total = a.repeat * len(a.sinks) * len(a.connections)
            n = 0
            for rep in range(1, a.repeat + 1):
                for sink in a.sinks:
                    for c in a.connections:
                        n += 1
                        # alternate who goes first, so drifting load falls on all of them
                        order = mtas if (n + rep) % 2 else mtas[::-1]
                        for name in order:
                            run = measure(
                                agents[name],
                                sinks[sink],
                                c,
                                rep,
                                a.messages,
                                a.size,
                                a.domains,
                                a.timeout,
                                dns,
                                a.py_spy,
                            )
                            res.runs.append(run)
                            say(
                                f"[{n}/{total} {MTA_LABEL[name]} {SINK_LABEL[sink]} conns={c} "
                                f"rep {rep}] {(sinks[sink].command or [sink + ' sink'])[0]} on "
                                f"{HOST}:{sinks[sink].port}\n    -> {describe(run)}"
                            )
                            if run.error and run.error.startswith("setup:"):
                                raise SetupError(run.error.removeprefix("setup: "))
        report(a, res, mtas)
    except SetupError as exc:
        say(f"setup: {exc}")
        return 1
    except KeyboardInterrupt:
        say("# interrupted")
        return 130
    finally:
        if a.keep:
            say(f"# work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
