"""The parent of ``[server] workers`` > 1: bind, start, watch, restart, forward signals.

The parent never accepts a connection or opens a queue shard. It binds the
listeners (:mod:`~trio_mta.workers.sockets`), generates the self-signed
certificate once (so workers never race to write it), starts each worker as a
fresh ``python -m trio_mta _worker`` (subprocess: fork+exec, never a bare fork
of this trio process) in a process group of its own, so a terminal's Ctrl-C
reaches the workers once, through the parent. It announces ``smtpd.listening``
once every worker is ready, which is what "started" means for one process.
Started as root with ``user`` set, it reads the key material and binds as root,
then drops root (:mod:`trio_mta.privileges`) before starting any worker, and
hands the workers that material (:mod:`~trio_mta.workers.secrets`).

- A worker that dies is restarted with the same sockets; one that keeps dying
  within ``STABLE_AFTER`` seconds of its start waits longer each time
  (``restart_delay``), so a crash loop never spins. A worker that fails
  before the service ever was ready stops the whole start instead: that is a
  configuration problem, and the worker has already said which on stderr.
- SIGTERM/SIGINT: every worker is asked to stop gracefully; the parent exits 0
  once all have, each with status 0. A second one is forwarded too (stop now).
- SIGHUP: forwarded to every ready worker; a worker still starting gets it as
  soon as it is ready (before then it has no handler, and SIGHUP would kill it).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from trio_mta import log, privileges
from trio_mta.config import Config, ListenConfig
from trio_mta.metrics import serve_metrics
from trio_mta.workers.metrics import WorkerMetrics
from trio_mta.workers.secrets import SecretFds
from trio_mta.workers.sockets import bind_group
from trio_mta.workers.worker import READY, WORKER_COMMAND, ListenerFd, WorkerSpec

STABLE_AFTER = 30.0
FIRST_DELAY = 0.25
MAX_DELAY = 30.0
_CLEAN = (0, -signal.SIGTERM, -signal.SIGINT)  # the latter two: stopped before it was ready


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker that died ``failures`` times in a row, quickly."""
    return min(MAX_DELAY, FIRST_DELAY * 2.0 ** max(0, failures - 1))


def _status(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


@dataclass
class _Child:
    index: int
    proc: trio.Process | None = None
    ready: bool = False
    hup_pending: bool = False


class Supervisor:
    def __init__(self, config: Config, worker_args: list[str], count: int) -> None:
        self.config = config
        self.worker_args = worker_args
        self.count = count
        self.children = [_Child(index) for index in range(count)]
        self.groups: list[tuple[ListenConfig, list[socket.socket]]] = []
        self.metrics: WorkerMetrics | None = None
        self.stopping = False
        self.announced = False
        self.exit_code = 0
        self._stop = trio.Event()
        self._alive_r = -1
        self.secrets: SecretFds | None = None

    async def run(self) -> int:
        from trio_mta.server.startup import (
            build_ssl_context,
            certificate_paths,
            prepare_state_dirs,
            raise_nofile_limit,
        )

        raise_nofile_limit()  # inherited by the workers
        config = self.config
        identity = privileges.target_identity(config)
        await trio.to_thread.run_sync(prepare_state_dirs, config, identity)
        await trio.to_thread.run_sync(build_ssl_context, config)
        alive_w = -1
        try:
            if identity is not None:
                # Read as root what the workers (started as the user) could not.
                privileges.hand_over_generated_certificate(config, identity)
                cert, key = certificate_paths(config)
                self.secrets = SecretFds.read(cert, key, config.auth.users_file)
            for listen in config.listen:
                self.groups.append((listen, bind_group(listen, self.count)))
            if identity is not None:
                privileges.drop(identity)
            # Only this process holds the write end (os.pipe is close-on-exec):
            # when it dies, every worker reads end-of-file.
            self._alive_r, alive_w = os.pipe()
            wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
            with trio.open_signal_receiver(*wanted) as signals:
                async with trio.open_nursery() as nursery:
                    address = config.metrics.address
                    if address is not None:
                        self.metrics = WorkerMetrics(self.count)
                        await nursery.start(serve_metrics, self.metrics, *address)
                    nursery.start_soon(self._watch_signals, signals)
                    log.event("mta.supervising", workers=self.count, pid=os.getpid())
                    async with trio.open_nursery() as keepers:
                        for child in self.children:
                            keepers.start_soon(self._keep_running, child)
                    nursery.cancel_scope.cancel()
        finally:
            if self.metrics is not None:
                self.metrics.close()
            for _, group in self.groups:
                for sock in set(group):
                    sock.close()
            for fd in (self._alive_r, alive_w):
                if fd >= 0:
                    os.close(fd)
            if self.secrets is not None:
                self.secrets.close()
        log.event("mta.stopped", workers=self.count)
        return self.exit_code

    # -- one worker --------------------------------------------------------------------

    async def _keep_running(self, child: _Child) -> None:
        failures = 0
        while not self.stopping:
            started = trio.current_time()
            code = await self._run_once(child)
            if self.stopping:
                if code not in _CLEAN:
                    log.error("worker.stop_failed", worker=child.index, status=_status(code))
                    self.exit_code = self.exit_code or 1
                return
            if not self.announced:
                log.error("worker.failed_to_start", worker=child.index, status=_status(code))
                self.exit_code = code if 0 < code < 256 else 1
                self._begin_stop(signal.SIGTERM)
                return
            failures = failures + 1 if trio.current_time() - started < STABLE_AFTER else 1
            delay = restart_delay(failures)
            log.error(
                "worker.died", worker=child.index, status=_status(code), restart_in=f"{delay:.2f}s"
            )
            if self.metrics is not None:
                self.metrics.restarted()
            with trio.move_on_after(delay):
                await self._stop.wait()

    async def _run_once(self, child: _Child) -> int:
        ready_r, ready_w = os.pipe()
        parent_end = child_end = None
        if self.metrics is not None:
            parent_end, child_end = socket.socketpair()
        spec = WorkerSpec(
            index=child.index,
            count=self.count,
            alive_fd=self._alive_r,
            ready_fd=ready_w,
            metrics_fd=None if child_end is None else child_end.fileno(),
            listeners=[
                ListenerFd.of(group[child.index].fileno(), listen) for listen, group in self.groups
            ],
        )
        if self.secrets is not None:
            spec.cert_fd, spec.key_fd = self.secrets.cert_fd, self.secrets.key_fd
            spec.users_fd, spec.users_signature = (
                self.secrets.users_fd,
                self.secrets.users_signature,
            )
        command = [
            sys.executable,
            "-m",
            "trio_mta",
            WORKER_COMMAND,
            spec.to_json(),
            *self.worker_args,
        ]
        try:
            proc = await trio.lowlevel.open_process(command, pass_fds=spec.fds, process_group=0)
        except BaseException:
            os.close(ready_r)
            if parent_end is not None:
                parent_end.close()
            raise
        finally:
            os.close(ready_w)
            if child_end is not None:
                child_end.close()
        child.proc, child.ready, child.hup_pending = proc, False, False
        log.event("worker.started", worker=child.index, pid=proc.pid)
        if self.stopping:
            proc.send_signal(signal.SIGTERM)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._await_ready, child, ready_r, parent_end)
                code = await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            child.proc, child.ready = None, False
            if self.metrics is not None:
                self.metrics.detach(child.index)
            if parent_end is not None:
                parent_end.close()
        return code

    async def _await_ready(
        self, child: _Child, ready_r: int, parent_end: socket.socket | None
    ) -> None:
        async with trio.lowlevel.FdStream(ready_r) as stream:
            data = b""
            while len(data) < len(READY):
                chunk = await stream.receive_some(64)
                if not chunk:
                    return  # died before it was ready
                data += chunk
        if data != READY or child.proc is None:
            return
        child.ready = True
        if self.metrics is not None and parent_end is not None:
            self.metrics.attach(child.index, parent_end)
        if child.hup_pending:
            child.hup_pending = False
            child.proc.send_signal(signal.SIGHUP)
        if not self.announced and all(c.ready for c in self.children):
            self.announced = True
            for listen, group in self.groups:
                bound = ListenConfig(listen.host, group[0].getsockname()[1], listen.mode)
                log.event(
                    "smtpd.listening", mode=listen.mode, address=bound.address, workers=self.count
                )

    # -- signals -----------------------------------------------------------------------

    def _begin_stop(self, signum: int) -> None:
        self.stopping = True
        self._stop.set()
        self._send_all(signum)

    def _send_all(self, signum: int) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.returncode is None:
                child.proc.send_signal(signum)

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.event("mta.signal", signal=signal.Signals(signum).name, workers=self.count)
            if signum == signal.SIGHUP:
                for child in self.children:
                    if child.proc is None or child.proc.returncode is not None:
                        continue  # restarting: it reads the file anew anyway
                    if child.ready:
                        child.proc.send_signal(signal.SIGHUP)
                    else:
                        child.hup_pending = True
            elif self.stopping:
                self._send_all(signum)  # the second one: workers stop at once
            else:
                self._begin_stop(signum)


async def supervise(config: Config, worker_args: list[str]) -> int:
    """Run ``[server] workers`` worker processes until SIGTERM/SIGINT; the exit status."""
    return await Supervisor(config, worker_args, config.server.effective_workers).run()
