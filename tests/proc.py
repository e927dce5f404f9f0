"""Run ``python -m trio_mta`` as a real process and find the ports it bound."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_LISTENING = re.compile(r"smtpd\.listening mode=(\w+) address=(\S+)")
_WORKER = re.compile(r"worker\.started worker=(\d+) pid=(\d+)")


def run_cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_mta", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    ports: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        config: Path,
        *extra: str,
        wait_for: int = 1,
        timeout: float = 30,
        prefix: tuple[str, ...] = (),
    ) -> ServerProcess:
        """``prefix``: a wrapper command that ends by exec-ing its arguments."""
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "trio_mta", "serve", "--config", str(config), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        server = cls(proc)
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        while len(server.ports) < wait_for:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(
                    "server did not start:\n" + "".join(server.log) + proc.stdout.read()
                )
            line = proc.stdout.readline()
            server.log.append(line)
            match = _LISTENING.search(line)
            if match:
                server.ports[match.group(1)] = int(match.group(2).rsplit(":", 1)[1])
        # Keep draining the log so a chatty server never blocks on a full pipe.
        threading.Thread(target=server._drain, daemon=True).start()
        return server

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)

    def wait_for_log(self, needle: str, timeout: float = 10, count: int = 1) -> bool:
        """True once ``count`` lines hold ``needle`` (one per worker: ``count=workers``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count_log(needle) >= count:
                return True
            time.sleep(0.05)
        return False

    def count_log(self, needle: str) -> int:
        return sum(needle in line for line in list(self.log))

    def worker_pids(self) -> dict[int, int]:
        """The latest pid of each worker started by a supervising parent (empty if none)."""
        pids: dict[int, int] = {}
        for line in list(self.log):
            match = _WORKER.search(line)
            if match:
                pids[int(match.group(1))] = int(match.group(2))
        return pids

    @property
    def workers(self) -> int:
        """How many processes serve: the supervisor's worker count, else 1."""
        return len(self.worker_pids()) or 1

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
