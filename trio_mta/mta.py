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

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from trio_mta import log, privileges
from trio_mta.auth.service import MailAuth
from trio_mta.config import Config
from trio_mta.config.schema import format_host_port
from trio_mta.delivery.agent import DeliveryAgent
from trio_mta.delivery.lmtp import LMTPAgent
from trio_mta.delivery.maildir import MaildirAgent
from trio_mta.delivery.remote import RemoteAgent
from trio_mta.dns import Resolver
from trio_mta.metrics import Metrics, QueueStats, serve_metrics
from trio_mta.queue.bodies import BodyFiles
from trio_mta.queue.bouncer import Bouncer
from trio_mta.queue.ids import host_tag_for, worker_tag
from trio_mta.queue.scheduler import Scheduler
from trio_mta.queue.shards import ShardLock, drained_by, shard_path
from trio_mta.queue.store import DueRecipient, QueueError, QueueStore
from trio_mta.queue.writer import QueueWriter
from trio_mta.routing.router import Router
from trio_mta.server.envelope import MessageSink
from trio_mta.server.errors import ListenError
from trio_mta.server.handler import Handler, HandlerSink
from trio_mta.server.immediate_sink import ImmediateLocalDelivery
from trio_mta.server.limits import ConnectionLimits
from trio_mta.server.listeners import BoundListener, Listener, accept_loop, adopt, bind
from trio_mta.server.passwords import PasswordFile
from trio_mta.server.queue_sink import QueueSink
from trio_mta.server.session import ServerState
from trio_mta.server.startup import (
    build_ssl_context,
    prepare_state_dirs,
    raise_nofile_limit,
)
from trio_mta.tls import TLSConfigError, server_context
from trio_mta.workers.metrics import answer_metrics_requests
from trio_mta.workers.slot import WorkerSlot

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
    # Scheduler and bouncer of each leftover shard this process drains (queue/shards.py).
    drains: list[tuple[Scheduler, Bouncer]] = field(default_factory=list)
    # Local recipients delivered before the 250 ([local] deliver_at_once), not via the queue.
    immediate: ImmediateLocalDelivery | None = None
    _stop: trio.Event = field(default_factory=trio.Event)

    @property
    def delivered(self) -> int:
        """Recipients delivered since start: at once, by the scheduler, and from drained shards."""
        total = self.immediate.delivered if self.immediate is not None else 0
        if self.scheduler is not None:
            total += self.scheduler.delivered
        return total + sum(scheduler.delivered for scheduler, _ in self.drains)

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
        ssl_context = await trio.to_thread.run_sync(_reloaded_ssl_context, self, new)
        old = self.config
        pending = _restart_only_changes(old, new)
        if pending:
            log.warning("config.reload_partial", needs_restart=",".join(pending))
        state = self.state
        state.config = new
        state.router = Router(new.local, new.relay)
        state.mail_auth = MailAuth(new, metrics=self.metrics)
        state.ssl_context = ssl_context
        if state.passwords is None or state.passwords.path != new.auth.users_file:
            # Same file: keep the object, which re-reads it on change anyway and keeps
            # what root read at start if the dropped user cannot read it.
            state.passwords = PasswordFile(new.auth.users_file)
        state.limits.reconfigure(new.limits.max_connections, new.limits.max_connections_per_ip)
        primary: list[tuple[Scheduler, Bouncer]] = []
        if self.scheduler is not None and self.bouncer is not None:
            primary.append((self.scheduler, self.bouncer))
        for scheduler, bouncer in [*primary, *self.drains]:
            bouncer.router = state.router
            scheduler.retry_initial = new.queue.retry_initial
            scheduler.retry_max = new.queue.retry_max
            scheduler.max_age = new.queue.max_age
        self.config = new
        log.event("config.reloaded", source=str(new.source or "built-in defaults"))

    def address(self, mode: str = "smtp") -> tuple[str, int]:
        """(host, port) of the first listener of ``mode`` — handy in tests and embedders."""
        for listener in self.listeners:
            if listener.mode == mode:
                return listener.host, listener.port
        raise LookupError(f"no {mode} listener")


def _reloaded_ssl_context(mta: MTA, new: Config) -> ssl.SSLContext | None:
    """The new TLS context; after a privilege drop, a key file only root may read
    (unchanged in the configuration) keeps the context in use instead of failing the
    whole reload: maps and limits still change, the certificate waits for a restart."""
    try:
        return build_ssl_context(new)
    except TLSConfigError as exc:
        same_files = (mta.config.tls.cert, mta.config.tls.key) == (new.tls.cert, new.tls.key)
        dropped = privileges.dropped_to()
        if dropped is None or not same_files or not isinstance(exc.__cause__, PermissionError):
            raise
        log.warning(
            "tls.reload_kept",
            error=str(exc),
            user=dropped.user,
            effect="the certificate in use stays until a restart",
        )
        return mta.state.ssl_context


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """Changed settings that a reload does not apply; the operator is told, not surprised."""
    checks = {
        "[[listen]]": (old.listen, new.listen),
        "state_dir": (old.state_dir, new.state_dir),
        "hostname": (old.hostname, new.hostname),
        "[local].maildir_root": (old.local.maildir_root, new.local.maildir_root),
        "[local].lmtp": (old.local.lmtp, new.local.lmtp),
        "[local].maildir_group": (old.local.maildir_group, new.local.maildir_group),
        "[relay] (outbound)": (
            (
                old.relay.tls,
                old.relay.ca_file,
                old.relay.port,
                old.relay.smarthost,
                old.relay.smarthost_tls,
                old.relay.smarthost_auth,
                old.relay.prefer_ipv4,
                old.relay.mta_sts,
                old.relay.dane,
                old.relay.mta_sts_port,
            ),
            (
                new.relay.tls,
                new.relay.ca_file,
                new.relay.port,
                new.relay.smarthost,
                new.relay.smarthost_tls,
                new.relay.smarthost_auth,
                new.relay.prefer_ipv4,
                new.relay.mta_sts,
                new.relay.dane,
                new.relay.mta_sts_port,
            ),
        ),
        "[dns]": (old.dns, new.dns),
        "[queue].concurrency": (old.queue.concurrency, new.queue.concurrency),
        "[metrics]": (old.metrics, new.metrics),
        "[log]": (old.log, new.log),
        "user/group": ((old.user, old.group), (new.user, new.group)),
        "[server].workers": (old.server, new.server),
    }
    return [name for name, (before, after) in checks.items() if before != after]


async def serve(
    config: Config,
    *,
    handler: Handler | None = None,
    queue: bool = True,
    worker: WorkerSlot | None = None,
    task_status: trio.TaskStatus[MTA] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the MTA until cancelled or ``MTA.stop()``; started() once every listener accepts.

    ``handler`` (see :mod:`trio_mta.server.handler`) lets the application decide
    recipients and take messages itself. ``queue=False`` runs without the
    durable queue and its scheduler: every message must then be taken by the
    handler, and nothing is delivered to Maildir or relayed.

    ``worker`` is for ``trio-mta serve`` under ``[server] workers``: serve the
    sockets the parent bound, accept into this worker's queue shard and drain
    the shards no running worker accepts into (:mod:`trio_mta.queue.shards`).
    Without it (embedding, ``workers = 1``) this is the one process: it binds
    ``[[listen]]`` itself, accepts into shard 0 and drains every other shard.
    Run as root with ``config.user`` set, the whole process switches to that
    user after binding, for good (:mod:`trio_mta.privileges`).
    """
    if not queue and handler is None:
        raise ValueError("serve(queue=False) needs a handler to take the messages")
    raise_nofile_limit()
    # Started as root with `user` set, everything up to the binding happens as root and
    # the queue is opened as the user (trio_mta.privileges). A worker's parent did that.
    identity = privileges.target_identity(config) if worker is None else None
    await trio.to_thread.run_sync(prepare_state_dirs, config, identity)
    keys = worker.keys if worker is not None else None
    if keys is not None:
        privileges.note_dropped_by_parent()
        ssl_context = await trio.to_thread.run_sync(server_context, keys.cert, keys.key)
    else:
        ssl_context = await trio.to_thread.run_sync(build_ssl_context, config)
    passwords = PasswordFile(config.auth.users_file)
    users = keys.users if keys is not None else None
    if identity is not None:
        privileges.hand_over_generated_certificate(config, identity)
        users = passwords.snapshot()
    if users is not None:
        passwords.prime(*users)
    shards: list[_Shard] = []
    bound: list[BoundListener] = []
    try:
        if worker is None:
            for listen in config.listen:
                bound.append(await bind(listen))
        else:
            bound = [adopt(listen, sock) for listen, sock in worker.listeners]
        if identity is not None:
            privileges.drop(identity)
        if queue:
            shards = await _open_shards(config, worker)
        await _run(config, shards, bound, ssl_context, passwords, handler, worker, task_status)
    finally:
        for b in bound:
            b.socket_listener.socket.close()
        for shard in shards:
            shard.store.close()
            shard.lock.release()


@dataclass
class _Shard:
    """One queue shard this process delivers; only the first one is written by sessions."""

    index: int
    store: QueueStore
    lock: ShardLock


async def _open_shards(config: Config, worker: WorkerSlot | None) -> list[_Shard]:
    """This process's own shard first, then the leftovers it drains.

    A worker waits for its own shard's lock: the previous holder can only be
    a worker of a killed parent, still finishing its graceful stop. A leftover
    that another process holds is skipped: someone is delivering it already.
    """
    index, count = (worker.index, worker.count) if worker is not None else (0, 1)
    own = shard_path(config.state_dir, index)
    lock = ShardLock(own)
    if not await trio.to_thread.run_sync(lock.try_acquire):
        if worker is None:
            log.warning("queue.shard_in_use", shard=index, path=str(own))
        else:
            log.warning("queue.shard_waiting", shard=index, path=str(own))
            while not await trio.to_thread.run_sync(lock.try_acquire):
                await trio.sleep(0.2)
    shards: list[_Shard] = []
    try:
        shards.append(_Shard(index, await _open_store(own), lock))
        extras = await trio.to_thread.run_sync(drained_by, config.state_dir, index, count)
        for extra in extras:
            path = shard_path(config.state_dir, extra)
            extra_lock = ShardLock(path)
            if not await trio.to_thread.run_sync(extra_lock.try_acquire):
                log.event("queue.shard_skipped", shard=extra, reason="in use by another process")
                continue
            try:
                store = await _open_store(path)
            except BaseException:
                extra_lock.release()
                raise
            shards.append(_Shard(extra, store, extra_lock))
            log.event("queue.draining", shard=extra)
    except BaseException:
        for shard in shards:
            shard.store.close()
            shard.lock.release()
        lock.release()
        raise
    return shards


async def _open_store(path: Path) -> QueueStore:
    """Open one shard; a broken file is a QueueError naming it (one line at the CLI)."""
    try:
        return await trio.to_thread.run_sync(_open_shard_store, path)
    except QueueError as exc:
        message = str(exc)
        raise QueueError(message if str(path) in message else f"{path}: {message}") from None


def _open_shard_store(path: Path) -> QueueStore:
    """Open (recovering if damaged) one shard, and clear what a crash left half-written.

    Only the process holding the shard's lock gets here, so the sweep cannot
    touch a spool or body file another process is still writing.
    """
    store = QueueStore(path, recover=True)
    try:
        removed = store.sweep()
    except BaseException:
        store.close()
        raise
    if removed:
        log.event("queue.swept", path=str(path), files=removed)
    return store


async def _run(
    config: Config,
    shards: list[_Shard],
    bound: list[BoundListener],
    ssl_context: ssl.SSLContext,
    passwords: PasswordFile,
    handler: Handler | None,
    worker: WorkerSlot | None,
    task_status: trio.TaskStatus[MTA],
) -> None:
    tag = host_tag_for(config.hostname)
    if worker is not None:
        tag = worker_tag(tag, worker.index)
    metrics = Metrics()
    async with trio.open_nursery() as services:
        metrics_address = config.metrics.address if worker is None else None
        if metrics_address is not None:
            metrics_address = await services.start(serve_metrics, metrics, *metrics_address)
        if worker is not None and worker.metrics_channel is not None:
            services.start_soon(answer_metrics_requests, metrics, worker.metrics_channel)
        sink: MessageSink | None = None
        scheduler: Scheduler | None = None
        bouncer: Bouncer | None = None
        immediate: ImmediateLocalDelivery | None = None
        drains: list[tuple[Scheduler, Bouncer]] = []
        router = Router(config.local, config.relay)
        if shards:
            store = shards[0].store
            writer = QueueWriter(store, tag)
            await services.start(writer.run)
            remote = RemoteAgent(
                config.relay,
                Resolver(
                    config.dns.nameservers, config.dns.timeout, prefer_ipv4=config.relay.prefer_ipv4
                ),
                hostname=config.hostname,
                state_dir=config.state_dir,
                metrics=metrics,
            )
            await services.start(remote.run)
            for shard in shards:
                shard_scheduler = _scheduler(config, shard.store, remote)
                shard_bouncer = Bouncer(
                    shard.store,
                    router,
                    hostname=config.hostname,
                    host_tag=tag,
                    on_queued=shard_scheduler.wake,
                    delay_warning=config.queue.delay_warning,
                )
                shard_scheduler.on_failed = shard_bouncer.kick
                shard_scheduler.on_outcome = _observe(metrics)
                await services.start(shard_scheduler.run)
                await services.start(shard_bouncer.run)
                drains.append((shard_scheduler, shard_bouncer))
            scheduler, bouncer = drains.pop(0)
            writer.on_committed = scheduler.wake
            metrics.set_queue_stats_source(_stats_of([shard.store for shard in shards]))
            queue_sink = QueueSink(writer)
            sink = queue_sink
            # With [local] lmtp the mail store delivers: local mail goes through the queue.
            if config.local.deliver_at_once and config.local.lmtp is None:
                immediate = ImmediateLocalDelivery(
                    _maildir_agent(config, trio.CapacityLimiter(8)),
                    queue_sink,
                    on_outcome=_observe(metrics),
                )
                await services.start(immediate.run)
                sink = immediate
        if handler is not None:
            sink = HandlerSink(handler, sink)
        assert sink is not None
        if not shards:  # no queue: large bodies still spool, for the handler to read
            await trio.to_thread.run_sync(BodyFiles(config.queue_path).ensure_spool)
        state = ServerState(
            config=config,
            router=router,
            sink=sink,
            limits=ConnectionLimits(
                config.limits.max_connections, config.limits.max_connections_per_ip
            ),
            ssl_context=ssl_context,
            passwords=passwords,
            host_tag=tag,
            handler=handler,
            metrics=metrics,
            # Sessions spool into their shard's folder: renaming into its bodies/ is then
            # always within one file system, and its startup sweep is its own.
            spool_dir=(
                shards[0].store.files.spool if shards else BodyFiles(config.queue_path).spool
            ),
            mail_auth=MailAuth(config, metrics=metrics),
        )
        mta = MTA(
            config=config,
            listeners=[b.info for b in bound],
            state=state,
            metrics=metrics,
            metrics_address=metrics_address,
            store=shards[0].store if shards else None,
            scheduler=scheduler,
            bouncer=bouncer,
            drains=drains,
            immediate=immediate,
        )
        try:
            async with trio.open_nursery() as sessions:
                async with trio.open_nursery() as accepting:
                    for b in bound:
                        accepting.start_soon(accept_loop, b, state, sessions)
                    if worker is None:  # a supervised worker's parent announces the listeners
                        for info in mta.listeners:
                            address = format_host_port(info.host, info.port)
                            log.event("smtpd.listening", mode=info.mode, address=address)
                    task_status.started(mta)
                    await mta._stop.wait()
                    log.event("mta.stopping", sessions=len(state.sessions))
                    accepting.cancel_scope.cancel()
                state.begin_shutdown()
                sessions.cancel_scope.deadline = trio.current_time() + state.shutdown_grace
        finally:
            # Kept milter connections (milter/pool.py) close with the sessions that used them.
            await state.milter_pool.aclose()
        services.cancel_scope.cancel()
    log.event("mta.stopped")


def _stats_of(stores: list[QueueStore]) -> Callable[[], QueueStats]:
    """Queue gauges over every shard this process delivers: sizes add up, ages take the oldest."""

    def stats() -> QueueStats:
        size, oldest = 0, None
        for store in stores:
            count, age = store.stats()
            size += count
            if age is not None and (oldest is None or age > oldest):
                oldest = age
        return size, oldest

    return stats


def _maildir_agent(config: Config, disk: trio.CapacityLimiter) -> MaildirAgent:
    return MaildirAgent(
        config.local.maildir_root, config.hostname, limiter=disk, group=config.local.maildir_group
    )


def _local_agent(config: Config) -> DeliveryAgent:
    """LMTP into the mail store when ``[local] lmtp`` is set, else Maildir."""
    if config.local.lmtp is not None:
        return LMTPAgent(config.local.lmtp, config.hostname)
    return _maildir_agent(config, trio.CapacityLimiter(8))


def _scheduler(config: Config, store: QueueStore, remote: RemoteAgent) -> Scheduler:
    return Scheduler(
        store,
        local_agent=_local_agent(config),
        remote_agent=remote,
        retry_initial=config.queue.retry_initial,
        retry_max=config.queue.retry_max,
        max_age=config.queue.max_age,
        concurrency=config.queue.concurrency,
        # Through a smarthost every domain shares one next hop: recipients group
        # by message only, and there is no per-domain share to keep.
        single_destination=bool(config.relay.smarthost),
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
