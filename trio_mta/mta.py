"""``serve()``: the one nursery that owns every listener, session and queue task.

Shutdown order is the point of this module. A stop request first closes the
listeners, then lets sessions that are mid-transaction finish (up to
``shutdown_grace``, 30 s) while idle ones get ``421 4.3.2``, and only then
stops the queue writer and the scheduler, so no session waits on a commit
that can no longer happen. Cancelling the caller's scope instead (the
embedding case) stops everything at once; a message whose commit raced the
cancellation is at worst delivered without its ``250``, never lost.
"""

from __future__ import annotations

import contextlib
import resource
import ssl
from dataclasses import dataclass, field

import trio

from . import log
from .auth import PasswordFile
from .config import Config
from .delivery.maildir import MaildirAgent
from .queue import QueueStore, QueueWriter, Scheduler, host_tag
from .routing import Router
from .server.envelope import MessageSink
from .server.limits import ConnectionLimits
from .server.listeners import BoundListener, Listener, ListenError, accept_loop, bind
from .server.queue_sink import QueueSink
from .server.session import ServerState
from .tls import ensure_certificate, server_context

__all__ = ["MTA", "ListenError", "Listener", "serve"]


@dataclass
class MTA:
    """Handle on a running server, as returned by ``nursery.start(serve, config)``."""

    config: Config
    listeners: list[Listener]
    store: QueueStore
    state: ServerState
    scheduler: Scheduler
    _stop: trio.Event = field(default_factory=trio.Event)

    def stop(self) -> None:
        """Begin a graceful stop; ``serve()`` returns when it is complete."""
        self._stop.set()

    def address(self, mode: str = "smtp") -> tuple[str, int]:
        """(host, port) of the first listener of ``mode`` — handy in tests and embedders."""
        for listener in self.listeners:
            if listener.mode == mode:
                return listener.host, listener.port
        raise LookupError(f"no {mode} listener")


def raise_nofile_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard limit: every idle client holds a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def build_ssl_context(config: Config) -> ssl.SSLContext:
    cert, key = ensure_certificate(config.tls.cert, config.tls.key,
                                   hostname=config.hostname, state_dir=config.state_dir)
    return server_context(cert, key)


async def serve(
    config: Config,
    *,
    sink: MessageSink | None = None,
    task_status: trio.TaskStatus[MTA] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the MTA until cancelled or ``MTA.stop()``; started() once every listener accepts.

    ``sink`` replaces the durable queue as the destination of accepted
    messages (the handler API); the queue and its scheduler still run, so
    mail already queued keeps flowing.
    """
    raise_nofile_limit()
    await trio.to_thread.run_sync(
        lambda: config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700))
    ssl_context = await trio.to_thread.run_sync(build_ssl_context, config)
    store = await trio.to_thread.run_sync(QueueStore, config.queue_path)
    bound: list[BoundListener] = []
    try:
        for listen in config.listen:
            bound.append(await bind(listen))
        await _run(config, store, bound, ssl_context, sink, task_status)
    finally:
        for b in bound:
            b.socket_listener.socket.close()
        store.close()


async def _run(config: Config, store: QueueStore, bound: list[BoundListener],
               ssl_context: ssl.SSLContext, sink: MessageSink | None,
               task_status: trio.TaskStatus[MTA]) -> None:
    tag = host_tag(config.hostname)
    disk = trio.CapacityLimiter(8)
    async with trio.open_nursery() as services:
        writer = QueueWriter(store, tag)
        await services.start(writer.run)
        scheduler = Scheduler(
            store,
            local_agent=MaildirAgent(config.local.maildir_root, config.hostname, limiter=disk),
            remote_agent=None,
            retry_initial=config.queue.retry_initial,
            retry_max=config.queue.retry_max,
            max_age=config.queue.max_age,
            concurrency=config.queue.concurrency,
        )
        writer.on_committed = scheduler.wake
        await services.start(scheduler.run)
        state = ServerState(
            config=config,
            router=Router(config.local, config.relay),
            sink=sink if sink is not None else QueueSink(writer),
            limits=ConnectionLimits(config.limits.max_connections,
                                    config.limits.max_connections_per_ip),
            ssl_context=ssl_context,
            passwords=PasswordFile(config.auth.users_file),
            host_tag=tag,
        )
        mta = MTA(config=config, listeners=[b.info for b in bound], store=store,
                  state=state, scheduler=scheduler)
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accepting:
                for b in bound:
                    accepting.start_soon(accept_loop, b, state, sessions)
                for info in mta.listeners:
                    log.event("smtpd.listening", mode=info.mode, address=_addr(info))
                task_status.started(mta)
                await mta._stop.wait()
                log.event("mta.stopping", sessions=len(state.sessions))
                accepting.cancel_scope.cancel()
            state.begin_shutdown()
            sessions.cancel_scope.deadline = trio.current_time() + state.shutdown_grace
        services.cancel_scope.cancel()
    log.event("mta.stopped")


def _addr(info: Listener) -> str:
    return f"[{info.host}]:{info.port}" if ":" in info.host else f"{info.host}:{info.port}"
