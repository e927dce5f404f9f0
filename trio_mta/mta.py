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
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from trio_mta import log
from trio_mta.config import Config
from trio_mta.config.schema import format_host_port
from trio_mta.delivery.maildir import MaildirAgent
from trio_mta.delivery.remote import RemoteAgent
from trio_mta.dns import Resolver
from trio_mta.metrics import Metrics, serve_metrics
from trio_mta.queue.bouncer import Bouncer
from trio_mta.queue.ids import host_tag_for
from trio_mta.queue.scheduler import Scheduler
from trio_mta.queue.store import DueRecipient, QueueStore
from trio_mta.queue.writer import QueueWriter
from trio_mta.routing.router import Router
from trio_mta.server.envelope import MessageSink
from trio_mta.server.handler import Handler, HandlerSink
from trio_mta.server.limits import ConnectionLimits
from trio_mta.server.listeners import BoundListener, Listener, ListenError, accept_loop, bind
from trio_mta.server.passwords import PasswordFile
from trio_mta.server.queue_sink import QueueSink
from trio_mta.server.session import ServerState
from trio_mta.tls import ensure_certificate, server_context

__all__ = ["MTA", "ListenError", "Listener", "serve"]


@dataclass
class MTA:
    """Handle on a running server, as returned by ``nursery.start(serve, config)``."""

    config: Config
    listeners: list[Listener]
    state: ServerState
    metrics: Metrics
    metrics_address: tuple[str, int] | None  # where Prometheus scrapes, port 0 resolved
    store: QueueStore | None  # None when serving without the durable queue
    scheduler: Scheduler | None
    bouncer: Bouncer | None
    _stop: trio.Event = field(default_factory=trio.Event)

    def stop(self) -> None:
        """Begin a graceful stop; ``serve()`` returns when it is complete."""
        self._stop.set()

    async def reload(self, new: Config) -> None:
        """Apply a re-read configuration to new decisions without dropping connections.

        Maps, aliases, trusted networks, limits, retry timing and the TLS
        certificate take effect for the next command of every session; what
        only a restart applies is logged by name when it changed.
        Raises (keeping the old configuration) when the new TLS pair is bad.
        """
        ssl_context = await trio.to_thread.run_sync(build_ssl_context, new)
        old = self.config
        pending = _restart_only_changes(old, new)
        if pending:
            log.warning("config.reload_partial", needs_restart=",".join(pending))
        state = self.state
        state.config = new
        state.router = Router(new.local, new.relay)
        state.ssl_context = ssl_context
        state.passwords = PasswordFile(new.auth.users_file)
        state.limits.reconfigure(new.limits.max_connections, new.limits.max_connections_per_ip)
        if self.bouncer is not None:
            self.bouncer.router = state.router
        if self.scheduler is not None:
            self.scheduler.retry_initial = new.queue.retry_initial
            self.scheduler.retry_max = new.queue.retry_max
            self.scheduler.max_age = new.queue.max_age
        self.config = new
        log.event("config.reloaded", source=str(new.source or "built-in defaults"))

    def address(self, mode: str = "smtp") -> tuple[str, int]:
        """(host, port) of the first listener of ``mode`` — handy in tests and embedders."""
        for listener in self.listeners:
            if listener.mode == mode:
                return listener.host, listener.port
        raise LookupError(f"no {mode} listener")


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """Changed settings that a reload does not apply; the operator is told, not surprised."""
    checks = {
        "[[listen]]": (old.listen, new.listen),
        "state_dir": (old.state_dir, new.state_dir),
        "hostname": (old.hostname, new.hostname),
        "[local].maildir_root": (old.local.maildir_root, new.local.maildir_root),
        "[relay] (outbound)": (
            (old.relay.tls, old.relay.ca_file, old.relay.port, old.relay.smarthost,
             old.relay.smarthost_tls, old.relay.smarthost_auth, old.relay.prefer_ipv4),
            (new.relay.tls, new.relay.ca_file, new.relay.port, new.relay.smarthost,
             new.relay.smarthost_tls, new.relay.smarthost_auth, new.relay.prefer_ipv4)),
        "[dns]": (old.dns, new.dns),
        "[queue].concurrency": (old.queue.concurrency, new.queue.concurrency),
        "[metrics]": (old.metrics, new.metrics),
        "[log]": (old.log, new.log),
    }
    return [name for name, (before, after) in checks.items() if before != after]


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
    handler: Handler | None = None,
    queue: bool = True,
    task_status: trio.TaskStatus[MTA] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the MTA until cancelled or ``MTA.stop()``; started() once every listener accepts.

    ``handler`` (see :mod:`trio_mta.server.handler`) lets the application decide
    recipients and take messages itself. ``queue=False`` runs without the
    durable queue and its scheduler: every message must then be taken by the
    handler, and nothing is delivered to Maildir or relayed.
    """
    if not queue and handler is None:
        raise ValueError("serve(queue=False) needs a handler to take the messages")
    raise_nofile_limit()
    await trio.to_thread.run_sync(
        lambda: config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700))
    ssl_context = await trio.to_thread.run_sync(build_ssl_context, config)
    store = await trio.to_thread.run_sync(QueueStore, config.queue_path) if queue else None
    bound: list[BoundListener] = []
    try:
        for listen in config.listen:
            bound.append(await bind(listen))
        await _run(config, store, bound, ssl_context, handler, task_status)
    finally:
        for b in bound:
            b.socket_listener.socket.close()
        if store is not None:
            store.close()


async def _run(config: Config, store: QueueStore | None, bound: list[BoundListener],
               ssl_context: ssl.SSLContext, handler: Handler | None,
               task_status: trio.TaskStatus[MTA]) -> None:
    tag = host_tag_for(config.hostname)
    metrics = Metrics()
    async with trio.open_nursery() as services:
        metrics_address = config.metrics.address
        if metrics_address is not None:
            metrics_address = await services.start(serve_metrics, metrics, *metrics_address)
        sink: MessageSink | None = None
        scheduler: Scheduler | None = None
        bouncer: Bouncer | None = None
        router = Router(config.local, config.relay)
        if store is not None:
            writer = QueueWriter(store, tag)
            await services.start(writer.run)
            remote = RemoteAgent(
                config.relay,
                Resolver(config.dns.nameservers, config.dns.timeout,
                         prefer_ipv4=config.relay.prefer_ipv4),
                hostname=config.hostname, concurrency=config.queue.concurrency)
            await services.start(remote.run)
            scheduler = _scheduler(config, store, remote)
            writer.on_committed = scheduler.wake
            bouncer = Bouncer(store, router, hostname=config.hostname, host_tag=tag,
                              on_queued=scheduler.wake)
            scheduler.on_failed = bouncer.kick
            scheduler.on_outcome = _observe(metrics)
            metrics.set_queue_stats_source(store.stats)
            await services.start(scheduler.run)
            await services.start(bouncer.run)
            sink = QueueSink(writer)
        if handler is not None:
            sink = HandlerSink(handler, sink)
        assert sink is not None
        state = ServerState(
            config=config,
            router=router,
            sink=sink,
            limits=ConnectionLimits(config.limits.max_connections,
                                    config.limits.max_connections_per_ip),
            ssl_context=ssl_context,
            passwords=PasswordFile(config.auth.users_file),
            host_tag=tag,
            handler=handler,
            metrics=metrics,
        )
        mta = MTA(config=config, listeners=[b.info for b in bound], state=state, metrics=metrics,
                  metrics_address=metrics_address,
                  store=store, scheduler=scheduler, bouncer=bouncer)
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accepting:
                for b in bound:
                    accepting.start_soon(accept_loop, b, state, sessions)
                for info in mta.listeners:
                    address = format_host_port(info.host, info.port)
                    log.event("smtpd.listening", mode=info.mode, address=address)
                task_status.started(mta)
                await mta._stop.wait()
                log.event("mta.stopping", sessions=len(state.sessions))
                accepting.cancel_scope.cancel()
            state.begin_shutdown()
            sessions.cancel_scope.deadline = trio.current_time() + state.shutdown_grace
        services.cancel_scope.cancel()
    log.event("mta.stopped")


def _scheduler(config: Config, store: QueueStore, remote: RemoteAgent) -> Scheduler:
    disk = trio.CapacityLimiter(8)
    return Scheduler(
        store,
        local_agent=MaildirAgent(config.local.maildir_root, config.hostname, limiter=disk),
        remote_agent=remote,
        retry_initial=config.queue.retry_initial,
        retry_max=config.queue.retry_max,
        max_age=config.queue.max_age,
        concurrency=config.queue.concurrency,
        # Through a smarthost every domain shares one destination: no per-domain
        # share to keep, the agent's own limit is the only one.
        per_domain=config.queue.concurrency if config.relay.smarthost else None,
        # Batches of 32 keep fsyncs per message near 1 (one new/ fsync per folder
        # per batch) while bounding the bodies held in memory at once.
        batch_size=32,
    )


def _observe(metrics: Metrics) -> Callable[[DueRecipient, str, float], None]:
    """Scheduler outcomes into metrics: counts by destination kind, latency of deliveries."""

    def observe(rcpt: DueRecipient, status: str, now: float) -> None:
        destination = "local" if rcpt.mailbox is not None else "remote"
        metrics.recipient_outcome(status, destination)
        if status == "delivered":
            metrics.delivery_latency(destination, max(0.0, now - rcpt.received_at))

    return observe


