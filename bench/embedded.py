"""Embedded benchmark: the handler API without a queue, beside aiosmtpd, in the same run.

Both servers run an equivalent handler that accepts every recipient, counts
each message and answers 250; nothing is written anywhere. trio_mta runs
``serve(config, handler=..., queue=False)``, aiosmtpd its ``SMTP`` protocol
on asyncio's default loop. Each is a separate process, started by this
script, which then drives them in turn with Postfix's smtp-source (one
connection per message, no pipelining). See bench/README.md.

    python bench/embedded.py --quick      # smoke run: -m 1000, R=1
    python bench/embedded.py              # -s 50 -m 5000 -l 1024, R=3

Never fails on timing: it prints what it measured. Exit 1 only when the
benchmark could not be set up (a server does not start, no smtp-source).
Only the standard library is imported at the top: the same file runs the
aiosmtpd server under an interpreter that may not have trio_mta.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
DEFAULT_PEERS = HERE.parents[2] / "shared" / "peers"
HOST = "127.0.0.1"
SENDER = "a@bench.test"
RCPT = "u@bench.test"
TARGETS = ("trio", "aiosmtpd")
LABEL = {"trio": "trio_mta handler", "aiosmtpd": "aiosmtpd handler"}
GOAL = 1.5  # issue 6: trio_mta's handler API at least 1.5x aiosmtpd's messages/s


def say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- the two servers
# Run as `python bench/embedded.py --serve trio|aiosmtpd --port N [--state-dir D]`.
# Each prints "ready" once it accepts and "count N" after SIGTERM.


def serve_trio(port: int, state_dir: Path) -> None:
    import trio

    import trio_mta
    from trio_mta import log

    # Prebuilt replies: a string answer would be parsed into a Reply per call.
    rcpt_ok = trio_mta.Reply(250, "2.1.5", "OK")
    data_ok = trio_mta.Reply(250, "2.0.0", "OK")

    class Counter(trio_mta.Handler):
        count = 0

        async def handle_rcpt(
            self, session: trio_mta.SessionInfo, envelope: trio_mta.Envelope, address: str
        ) -> trio_mta.Reply:
            return rcpt_ok

        async def handle_message(
            self, session: trio_mta.SessionInfo, envelope: trio_mta.Envelope, data: bytes
        ) -> trio_mta.Reply:
            self.count += 1
            return data_ok

    handler = Counter()
    config = trio_mta.Config.from_mapping(
        {
            "hostname": "bench-embedded.localdomain",
            "state_dir": str(state_dir),  # only the generated STARTTLS certificate lives here
            "listen": [{"address": f"{HOST}:{port}", "mode": "smtp"}],
            "local": {"domains": ["bench.test"]},
            "limits": {"max_connections": 20000, "max_connections_per_ip": 20000},
        },
        base_dir=state_dir,
    )
    log.setup("warning")

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: trio_mta.serve(
                        config, handler=handler, queue=False, task_status=task_status
                    )
                )
                print("ready", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    print(f"count {handler.count}", flush=True)


def serve_aiosmtpd(port: int) -> None:
    import asyncio

    from aiosmtpd.smtp import SMTP  # type: ignore[import-not-found,import-untyped,unused-ignore]

    class Counter:
        count = 0

        async def handle_RCPT(
            self,
            server: object,
            session: object,
            envelope: object,
            address: str,
            rcpt_options: list[str],
        ) -> str:
            envelope.rcpt_tos.append(address)  # type: ignore[attr-defined]
            return "250 2.1.5 OK"

        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            self.count += 1
            return "250 2.0.0 OK"

    handler = Counter()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(
                handler,
                hostname="bench-aiosmtpd.localdomain",
                ident="aiosmtpd-bench",
                data_size_limit=36700160,
            ),
            HOST,
            port,
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
    print(f"count {handler.count}", flush=True)


# ---------------------------------------------------------------- helpers


def wait_port(port: int, timeout: float, proc: subprocess.Popen[str]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
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


def cpu_seconds(pid: int) -> float | None:
    """utime+stime of a process (all its threads), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def ensure_smtp_source() -> str | None:
    path = shutil.which("smtp-source")
    if path is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(
            ["debconf-set-selections"],
            input=b"postfix postfix/main_mailer_type select No configuration\n",
            env=env,
            check=False,
            timeout=60,
        )
        say("# installing postfix for smtp-source: apt-get install -y postfix")
        subprocess.run(
            ["apt-get", "install", "-y", "postfix"],
            env=env,
            check=False,
            timeout=900,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        path = shutil.which("smtp-source")
    return path


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
    """This interpreter when it has aiosmtpd (same Python for both servers), else the
    peers venv, installing it with ../shared/peers/aiosmtpd.sh when it is missing."""
    if explicit:
        return explicit if has_aiosmtpd(explicit) else None
    if has_aiosmtpd(sys.executable):
        return sys.executable
    work = Path(
        os.environ.get("PEERS_DIR") or Path(os.environ.get("TMPDIR") or "/tmp") / "trio-mta-peers"
    )
    venv = work / "venv" / "bin" / "python"
    script = peers / "aiosmtpd.sh"
    if not has_aiosmtpd(str(venv)) and script.is_file():
        say(f"# installing aiosmtpd: PEERS_DIR={work} bash {script} install")
        subprocess.run(
            ["bash", str(script), "install"],
            env=dict(os.environ, PEERS_DIR=str(work)),
            check=False,
            timeout=900,
            capture_output=True,
        )
    return str(venv) if has_aiosmtpd(str(venv)) else None


def python_version(python: str) -> str:
    result = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout.strip() or "?"


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


class SetupError(Exception):
    """The benchmark cannot run at all."""


@dataclass
class Server:
    """One server subprocess (this file with --serve)."""

    name: str
    python: str
    port: int
    workdir: Path
    proc: subprocess.Popen[str] | None = None
    count: int | None = None  # what the handler counted, reported at stop
    sent: int = 0  # what smtp-source was asked to send to it, warm-up included

    @property
    def command(self) -> list[str]:
        cmd = [self.python, str(HERE), "--serve", self.name, "--port", str(self.port)]
        if self.name == "trio":
            cmd += ["--state-dir", str(self.workdir / "trio-state")]
        return cmd

    def start(self) -> None:
        if port_open(self.port):
            raise SetupError(f"{HOST}:{self.port} already accepts connections; pick other ports")
        say(f"# starting {LABEL[self.name]}: {shlex.join(self.command)}")
        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        if not wait_port(self.port, 60, self.proc):
            output = self.stop()
            raise SetupError(
                f"{LABEL[self.name]} did not start on {HOST}:{self.port}:\n{output[-2000:]}"
            )

    def stop(self) -> str:
        """SIGTERM, then the handler's message count from the last output line."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        for line in reversed(output.splitlines()):
            if line.startswith("count "):
                self.count = int(line.split()[1])
                break
        return output


@dataclass
class Run:
    target: str
    rep: int
    command: str
    messages: int
    error: str | None = None
    wall_s: float | None = None
    cpu_s: float | None = None

    @property
    def rate(self) -> float | None:
        return self.messages / self.wall_s if self.wall_s and not self.error else None

    @property
    def cpu_ms_per_msg(self) -> float | None:
        if self.cpu_s is None or self.error:
            return None
        return 1000 * self.cpu_s / self.messages


def source_cmd(port: int, sessions: int, messages: int, size: int) -> list[str]:
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
        f"{HOST}:{port}",
    ]


def measure(
    server: Server, rep: int, sessions: int, messages: int, size: int, timeout: float
) -> Run:
    cmd = source_cmd(server.port, sessions, messages, size)
    run = Run(server.name, rep, shlex.join(cmd), messages)
    assert server.proc is not None
    pid = server.proc.pid
    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    try:
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        run.error = f"smtp-source still running after {timeout:.0f} s (killed)"
        return run
    run.wall_s = time.perf_counter() - t0
    cpu1 = cpu_seconds(pid)
    run.cpu_s = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    output = (result.stdout + result.stderr).strip()
    problems = []
    if output:  # smtp-source is silent unless a reply was not the expected one
        problems.append("smtp-source: " + " | ".join(output.splitlines()[:3]))
    if result.returncode != 0:
        problems.append(f"smtp-source exit status {result.returncode}")
    if server.proc.poll() is not None:
        problems.append("the server exited")
    run.error = "; ".join(problems) or None
    return run


def describe(run: Run) -> str:
    if run.error:
        return f"ERROR {run.error}"
    return (
        f"{fmt(run.rate, 1)} msg/s, wall {fmt(run.wall_s, 2)} s, server CPU "
        f"{fmt(run.cpu_ms_per_msg, 3)} ms/msg"
    )


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    say("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        say("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def report(a: argparse.Namespace, runs: list[Run], servers: list[Server]) -> None:
    say()
    say(
        f"Results: {a.sessions} sessions, {a.size} B messages, {a.messages} per run, "
        f"medians over the runs that succeeded (R={a.repeat})"
    )
    rows = []
    for name in TARGETS:
        mine = [r for r in runs if r.target == name]
        ok = [r for r in mine if not r.error]
        rates = [r.rate for r in ok if r.rate is not None]
        rows.append(
            [
                LABEL[name],
                fmt(median(rates), 1),
                f"{fmt(min(rates), 1)}..{fmt(max(rates), 1)}" if rates else "-",
                fmt(median([r.cpu_ms_per_msg for r in ok]), 3),
                f"{len(ok)}/{len(mine)}",
            ]
        )
    table(rows, ["server", "msg/s", "range", "CPU ms/msg", "runs ok"])
    trio_rate = median([r.rate for r in runs if r.target == "trio"])
    aio_rate = median([r.rate for r in runs if r.target == "aiosmtpd"])
    ratio = trio_rate / aio_rate if trio_rate and aio_rate else None
    paired = []
    for rep in range(1, a.repeat + 1):
        t = next((r.rate for r in runs if r.target == "trio" and r.rep == rep), None)
        o = next((r.rate for r in runs if r.target == "aiosmtpd" and r.rep == rep), None)
        if t and o:
            paired.append(t / o)
    say()
    say(
        f"trio_mta / aiosmtpd: {fmt(ratio, 2)}x (ratio of medians); per repetition: "
        f"{', '.join(f'{p:.2f}x' for p in paired) or '-'}"
    )
    for server in servers:
        say(
            f"{LABEL[server.name]} counted {server.count if server.count is not None else '?'} "
            f"messages; smtp-source sent it {server.sent} (warm-up included)"
        )
    say()
    say("Goal (issue 6), judged from this run (informational; the machine is shared):")
    verdict = "n/a" if ratio is None else ("met" if ratio >= GOAL else "MISSED")
    say(
        f"  {verdict:6} trio_mta handler API >= {GOAL:g}x aiosmtpd at {a.sessions} sessions: "
        f"{fmt(ratio, 2)}x"
    )


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="trio_mta's handler API (no queue) against "
        "aiosmtpd, messages/s under smtp-source (see bench/README.md)"
    )
    ap.add_argument(
        "-m", "--messages", type=int, help="messages per run (default 5000, quick 1000)"
    )
    ap.add_argument(
        "-R", "--repeat", type=int, help="runs per server, medians reported (default 3, quick 1)"
    )
    ap.add_argument("-s", "--sessions", type=int, default=50, help="parallel sessions (50)")
    ap.add_argument("-l", "--size", type=int, default=1024, help="message size in bytes (1024)")
    ap.add_argument("--quick", action="store_true", help="smoke run: -m 1000, R=1")
    ap.add_argument("--ports", default="2611,2612", help="trio_mta,aiosmtpd ports (2611,2612)")
    ap.add_argument(
        "--aiosmtpd-python",
        help="interpreter with aiosmtpd (default: this one if "
        "it has aiosmtpd, else the peers venv)",
    )
    ap.add_argument(
        "--peers",
        type=Path,
        default=DEFAULT_PEERS,
        help=f"folder with aiosmtpd.sh (default {DEFAULT_PEERS})",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=500,
        help="unmeasured messages per server before the first run (500)",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take (300)")
    # internal: run one of the servers
    ap.add_argument("--serve", choices=TARGETS, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.messages = a.messages or (1000 if a.quick else 5000)
    a.repeat = a.repeat or (1 if a.quick else 3)
    try:
        a.ports = [int(p) for p in a.ports.split(",")]
    except ValueError:
        ap.error(f"--ports: two comma-separated port numbers, got {a.ports!r}")
    if len(a.ports) != 2 or a.messages < 1 or a.repeat < 1 or a.sessions < 1:
        ap.error("--ports takes two ports; --messages, --repeat and --sessions are positive")
    return a


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.serve == "trio":
        serve_trio(a.port, a.state_dir)
        return 0
    if a.serve == "aiosmtpd":
        serve_aiosmtpd(a.port)
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    say(
        f"# trio_mta embedded benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
        f"cpus={os.cpu_count()}  load={os.getloadavg()[0]:.2f}"
    )
    say(f"# argv: {shlex.join([sys.executable, *sys.argv])}")
    say(
        f"# sessions={a.sessions} size={a.size} messages={a.messages} repeat={a.repeat} "
        f"warmup={a.warmup}; smtp-source: one connection per message (no -d), no pipelining"
    )
    if ensure_smtp_source() is None:
        say("smtp-source is not available (apt-get install -y postfix failed)")
        return 1
    aio_python = find_aiosmtpd_python(a.aiosmtpd_python, a.peers)
    if aio_python is None:
        say("aiosmtpd is not importable (pip install aiosmtpd, or --aiosmtpd-python)")
        return 1
    say(
        f"# python: trio_mta {python_version(sys.executable)} ({sys.executable}), "
        f"aiosmtpd {python_version(aio_python)} ({aio_python})"
    )
    workdir = Path(tempfile.mkdtemp(prefix="trio-mta-bench-embedded-"))
    servers = [
        Server("trio", sys.executable, a.ports[0], workdir),
        Server("aiosmtpd", aio_python, a.ports[1], workdir),
    ]
    runs: list[Run] = []
    try:
        for server in servers:
            server.start()
        for server in servers:
            if a.warmup:
                cmd = source_cmd(server.port, a.sessions, a.warmup, a.size)
                subprocess.run(cmd, capture_output=True, timeout=a.timeout, check=False)
                server.sent += a.warmup
        for rep in range(1, a.repeat + 1):
            # alternate the order so neither server always runs on a warmer machine
            order = servers if rep % 2 else servers[::-1]
            for server in order:
                run = measure(server, rep, a.sessions, a.messages, a.size, a.timeout)
                runs.append(run)
                server.sent += a.messages
                say(
                    f"[rep {rep}/{a.repeat} {LABEL[server.name]}] {run.command}\n"
                    f"    -> {describe(run)}"
                )
        for server in servers:
            server.stop()
        report(a, runs, servers)
    except SetupError as exc:
        say(f"setup: {exc}")
        return 1
    except KeyboardInterrupt:
        say("# interrupted")
        return 130
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
