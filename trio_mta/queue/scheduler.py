"""The scheduler: hands due recipients to delivery agents and records the outcomes.

One loop task leases due recipients (so none is handed out twice), starts
delivery batches in its nursery and goes on accepting wake-ups while they run.
Local recipients go to the local agent in batches of up to `batch_size`, so the
Maildir agent fsyncs files in parallel and each `new/` folder once per batch;
remote ones go to the remote agent grouped by message and destination (one
SMTP transaction each), at most `concurrency` at once and at most `per_domain`
of them to one destination, so one slow domain cannot hold every slot (as
Postfix's qmgr: the scheduler owns grouping and limits, the agent delivers the
batch it is given). A destination is the recipient's domain, or, with
`single_destination` (a smarthost), one next hop for everything: then recipients
group by message only and the one destination may use every slot. Under steady load a new local
batch starts at most every `batch_window` seconds, so mail gathers into batches
and a Maildir folder is fsynced once per batch, not once per message.

Outcomes: delivered; failed; deferred with exponential backoff
(retry_initial * 2**(n-1), capped at retry_max, ±10% jitter so retries to one
host spread out) until max_age, then failed with 4.4.7 (RFC 3463: delivery time
expired). The last retry is scheduled at the expiry time itself, so a message
gets its final attempt exactly at max_age rather than up to retry_max later.

On start every undelivered recipient is made due (startup recovery; leases live
in memory only). Besides `wake()`, the loop polls the database at least every
`poll_interval` seconds, so `queue flush` from another process is seen.
Cancellation leaves recipients pending or deferred: a result is recorded only
after the agent returned it, and recording it is shielded so it is not lost.
"""

from __future__ import annotations

import collections
import functools
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

from trio_mta import log
from trio_mta.delivery.agent import DeliveryAgent, DeliveryItem
from trio_mta.delivery.outcome import Outcome
from trio_mta.queue.bodies import StoredBody
from trio_mta.queue.report import iso
from trio_mta.queue.store import DueRecipient, QueueError, QueueStore, RecipientUpdate

T = TypeVar("T")
_REMOTE_FETCH_PER_SLOT = 8  # remote recipients looked at per free connection slot
_MIN_WAIT = 0.001  # seconds
_MAX_RECORD_RETRY = 60.0  # seconds between tries to store results while the database fails


def backoff_delay(attempts: int, *, initial: float, maximum: float, rng: random.Random) -> float:
    """Delay after the `attempts`-th failed attempt: initial * 2**(attempts-1), capped, ±10%."""
    base = min(initial * 2.0 ** min(max(attempts - 1, 0), 64), maximum)
    return min(base * rng.uniform(0.9, 1.1), maximum)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class Scheduler:
    """Runs deliveries; see the module doc."""

    def __init__(
        self,
        store: QueueStore,
        *,
        local_agent: DeliveryAgent,
        remote_agent: DeliveryAgent | None,
        retry_initial: float,
        retry_max: float,
        max_age: float,
        concurrency: int,
        per_domain: int | None = None,
        single_destination: bool = False,
        clock: Callable[[], float] = time.time,
        poll_interval: float = 1.0,
        batch_size: int = 128,
        local_batches: int = 2,
        batch_window: float = 0.1,
        limiter: trio.CapacityLimiter | None = None,
        rng: random.Random | None = None,
        store_in_threads: bool = True,
    ) -> None:
        if batch_size < 1 or local_batches < 1 or concurrency < 1:
            raise ValueError("batch_size, local_batches and concurrency must be at least 1")
        self.store = store
        self.local_agent = local_agent
        self.remote_agent = remote_agent
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_age = max_age
        self.concurrency = concurrency
        self.single_destination = single_destination
        # One slow domain may hold at most this many of the `concurrency` slots.
        if single_destination:
            self.per_domain = concurrency
        else:
            self.per_domain = per_domain if per_domain is not None else max(1, concurrency // 2)
        self._busy: collections.Counter[str] = collections.Counter()  # batches per destination
        self.clock = clock  # unix time; tests pass a MockClock-based one
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.local_batches = local_batches
        self.batch_window = batch_window
        self.delivered = 0
        self.deferred = 0
        self.failed = 0
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(4)
        self._rng = rng if rng is not None else random.Random()
        # False runs store calls in the trio thread: for tests under an autojump
        # MockClock, where time would race ahead while a worker thread runs.
        self._store_in_threads = store_in_threads
        self._wakeup = trio.Event()
        self._local_active = 0
        self._last_local_start = -math.inf  # trio time
        self._backlog = False  # the last local fetch was full: more may be waiting
        self._remote_active = 0
        # Called after a batch that failed someone is recorded (the bouncer's kick).
        self.on_failed: Callable[[], None] | None = None
        # Called per recorded outcome with (recipient, status, now): metrics.
        self.on_outcome: Callable[[DueRecipient, str, float], None] | None = None

    def wake(self) -> None:
        """Look for due work now (new mail committed, flush requested). Trio thread only."""
        self._wakeup.set()

    async def _thread(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        call = functools.partial(fn, *args, **kwargs)
        if not self._store_in_threads:
            await trio.lowlevel.checkpoint()
            return call()
        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled."""
        only_local = True if self.remote_agent is None else None
        recovered = await self._thread(self.store.flush, now=self.clock(), local=only_local)
        if recovered:
            log.event("queue.recovered", recipients=recovered)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._wakeup = trio.Event()
                try:
                    delay = await self._dispatch(nursery)
                except QueueError as exc:
                    log.error("queue.scan_failed", error=str(exc))
                    delay = self.poll_interval
                if delay > 0:
                    # The floor keeps float rounding (unix times near 2e9 have
                    # ~0.2 µs steps) from turning into a wait that never advances.
                    with trio.move_on_after(max(delay, _MIN_WAIT)):
                        await self._wakeup.wait()

    async def _dispatch(self, nursery: trio.Nursery) -> float:
        """Start what is due; return how many seconds to wait before looking again."""
        local_free = self.local_batches - self._local_active
        remote_free = self.concurrency - self._remote_active if self.remote_agent else 0
        now = self.clock()
        delays = [self.poll_interval]
        # Under steady load, let local mail gather for up to batch_window after the
        # previous batch started: every batch fsyncs each of its new/ folders once,
        # so fewer, larger batches mean fewer fsyncs per message. Mail arriving after
        # a quiet spell goes out at once; a backlog is never held back.
        since = trio.current_time() - self._last_local_start
        if local_free > 0 and not self._backlog and since < self.batch_window:
            delays.append(self.batch_window - since)
            local_free = 0
        if local_free <= 0 and remote_free <= 0:
            return min(delays)  # a finishing batch wakes us
        local_want = local_free * self.batch_size
        local_due, remote_due, bodies, next_local, next_remote = await self._thread(
            self._fetch, now, local_want, remote_free * _REMOTE_FETCH_PER_SLOT
        )
        if local_want:
            self._backlog = len(local_due) >= local_want
        remote_waiting = False
        if local_due:
            self._last_local_start = trio.current_time()
            if len(local_due) > self.batch_size:
                # Keep each mailbox in few batches: one new/ fsync per folder per batch.
                local_due.sort(key=lambda r: (r.mailbox or "", r.message_id))
            for start in range(0, len(local_due), self.batch_size):
                chunk = local_due[start : start + self.batch_size]
                self._local_active += 1
                nursery.start_soon(self._run_batch, self.local_agent, chunk, bodies, None)
        if remote_due and self.remote_agent is not None:
            groups: dict[tuple[str, str], list[DueRecipient]] = {}
            for r in remote_due:
                groups.setdefault((r.message_id, self._destination(r)), []).append(r)
            spare: list[int] = []
            for (_, destination), group in groups.items():
                if self._busy[destination] >= self.per_domain:
                    # Its destination is busy: holding a slot to wait there would let
                    # one slow domain take every slot. A finishing batch wakes us.
                    spare.extend(r.rcpt_id for r in group)
                    remote_waiting = True
                elif self._remote_active < self.concurrency:
                    self._remote_active += 1
                    self._busy[destination] += 1
                    nursery.start_soon(
                        self._run_batch, self.remote_agent, group, bodies, destination
                    )
                else:
                    spare.extend(r.rcpt_id for r in group)
            if spare:
                await self._thread(self.store.release, spare)
        # Due times are unix times; measure against the clock after the fetch.
        now = self.clock()
        if next_local is not None and self._local_active < self.local_batches:
            delays.append(next_local - now)
        if (
            next_remote is not None
            and self._remote_active < self.concurrency
            and not remote_waiting
        ):
            delays.append(next_remote - now)
        return min(delays)

    def _fetch(
        self, now: float, local_want: int, remote_want: int
    ) -> tuple[
        list[DueRecipient], list[DueRecipient], dict[str, StoredBody], float | None, float | None
    ]:
        """Worker thread: lease due recipients and read local bodies, once per message.

        Remote bodies are read by the batch that sends them: many remote
        recipients fetched here go straight back (their destination is busy),
        and reading their bodies too was most of the scheduler's cost then.
        """
        store = self.store
        local_due = store.due(now, local_want, local=True) if local_want else []
        remote_due = store.due(now, remote_want, local=False) if remote_want else []
        try:
            bodies = store.bodies([r.message_id for r in local_due])
            next_local = store.next_due(local=True) if local_want else None
            next_remote = store.next_due(local=False) if remote_want else None
        except BaseException:
            store.release([r.rcpt_id for r in (*local_due, *remote_due)])
            raise
        # A message deleted (`queue delete`) between the two reads has no body left.
        gone = [r.rcpt_id for r in local_due if r.message_id not in bodies]
        if gone:
            store.release(gone)
            local_due = [r for r in local_due if r.message_id in bodies]
        return local_due, remote_due, bodies, next_local, next_remote

    def _destination(self, rcpt: DueRecipient) -> str:
        return "" if self.single_destination else _domain(rcpt.address)

    async def _run_batch(
        self,
        agent: DeliveryAgent,
        rcpts: list[DueRecipient],
        bodies: dict[str, StoredBody],
        destination: str | None,
    ) -> None:
        """Deliver one batch: local (``destination`` None) or one remote destination."""
        recorded = False
        try:
            missing = list({r.message_id for r in rcpts} - bodies.keys())
            if missing:
                bodies = {**bodies, **await self._thread(self.store.bodies, missing)}
                gone = [r.rcpt_id for r in rcpts if r.message_id not in bodies]
                if gone:  # deleted meanwhile (`queue delete`): nothing left to send
                    await self._thread(self.store.release, gone)
                    rcpts = [r for r in rcpts if r.message_id in bodies]
                    if not rcpts:
                        return
            items = [DeliveryItem(r, bodies[r.message_id]) for r in rcpts]
            outcomes = await self._deliver(agent, items)
            now = self.clock()
            updates = [self._update_for(r, o, now) for r, o in zip(rcpts, outcomes, strict=True)]
            await self._record(updates, now)
            recorded = True
            self._log(rcpts, updates)
            if self.on_outcome is not None:
                for r, u in zip(rcpts, updates, strict=True):
                    self.on_outcome(r, u.status, now)
            if self.on_failed is not None and any(u.status == "failed" for u in updates):
                self.on_failed()
        finally:
            if not recorded:
                with trio.CancelScope(shield=True):
                    await self._thread(self.store.release, [r.rcpt_id for r in rcpts])
            if destination is None:
                self._local_active -= 1
            else:
                # The destination comes from the dispatcher, not from rcpts: a batch
                # whose message was deleted meanwhile has no recipients left.
                self._remote_active -= 1
                self._busy[destination] -= 1
                if not self._busy[destination]:
                    del self._busy[destination]
            self.wake()

    async def _record(self, updates: list[RecipientUpdate], now: float) -> None:
        """Store the results; while the database refuses, keep the leases and retry.

        The agent's work is done (files fsynced, the remote said 250), so the first
        try is shielded from cancellation. Releasing the leases on failure would hand
        the same recipients out again and repeat the delivery for as long as the
        database stays broken; holding them (and this batch slot) stops that.
        """
        delay = self.poll_interval
        shield = True
        while True:
            try:
                with trio.CancelScope(shield=shield):
                    await self._thread(self.store.update, updates, now=now)
                return
            except QueueError as exc:
                log.error("queue.update_failed", recipients=len(updates), error=str(exc))
            shield = False
            await trio.sleep(delay)
            delay = min(delay * 2, _MAX_RECORD_RETRY)

    async def _deliver(self, agent: DeliveryAgent, items: list[DeliveryItem]) -> list[Outcome]:
        """Call the agent; a crashing or inconsistent agent defers, it never stops the queue."""
        try:
            outcomes = list(await agent.deliver(items))
        except Exception as exc:
            log.error("delivery.agent_error", agent=type(agent).__name__, error=str(exc))
            return [_internal(f"internal delivery error: {exc}")] * len(items)
        if len(outcomes) != len(items):
            log.error(
                "delivery.agent_error",
                agent=type(agent).__name__,
                error=f"{len(outcomes)} outcomes for {len(items)} recipients",
            )
            return [_internal("internal delivery error")] * len(items)
        return outcomes

    def _update_for(self, rcpt: DueRecipient, outcome: Outcome, now: float) -> RecipientUpdate:
        if outcome.kind != "deferred":
            return RecipientUpdate(rcpt.rcpt_id, outcome)
        expires = rcpt.received_at + self.max_age
        if now >= expires:
            # RFC 3463 4.4.7: delivery time expired; the last error says why.
            expired = Outcome(
                "failed",
                "4.4.7",
                f"message expired after {rcpt.attempts + 1} attempts; last error: {outcome.detail}",
                stage="queue",
            )
            return RecipientUpdate(rcpt.rcpt_id, expired)
        delay = backoff_delay(
            rcpt.attempts + 1, initial=self.retry_initial, maximum=self.retry_max, rng=self._rng
        )
        return RecipientUpdate(rcpt.rcpt_id, outcome, min(now + delay, expires))

    def _log(self, rcpts: Sequence[DueRecipient], updates: Sequence[RecipientUpdate]) -> None:
        """One line per recipient and attempt, Postfix-style, carrying the queue ID (SPEC §6)."""
        for r, u in zip(rcpts, updates, strict=True):
            if u.status == "delivered":
                self.delivered += 1
            elif u.status == "deferred":
                self.deferred += 1
            else:
                self.failed += 1
            expired = u.outcome.stage == "queue" and u.outcome.status == "4.4.7"
            log.event(
                "queue.expired" if expired else f"queue.{u.status}",
                id=r.message_id,
                to=r.address,
                mailbox=r.mailbox,
                attempts=r.attempts + 1,
                next_attempt=iso(u.next_attempt),
                detail=u.outcome.detail,
            )


def _internal(text: str) -> Outcome:
    return Outcome("deferred", "4.3.0", text, stage="queue")
