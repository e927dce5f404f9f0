"""Scheduler: batching, retries in virtual time, expiry, recovery, leases, wake-ups, cancellation.

Retry schedules run under trio's autojump MockClock, so hours pass in milliseconds.
Those tests run store calls in the trio thread (store_in_threads=False): while a
worker thread runs, the autojump clock would see an idle loop and race ahead. The
Maildir test runs the real thing (threads, real clock, real files).
"""

from __future__ import annotations

import itertools
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.outcomes import o
from trio_mta.delivery.agent import DeliveryAgent, DeliveryItem, Outcome
from trio_mta.delivery.maildir import MaildirAgent
from trio_mta.queue.bodies import StoredBody
from trio_mta.queue.scheduler import Scheduler, backoff_delay
from trio_mta.queue.store import NewMessage, NewRecipient, QueueStore

BASE = 1_800_000_000.0
DATA = b"Subject: t\r\n\r\nbody\r\n"


def vclock() -> float:
    """Unix time that follows trio's (virtual) clock."""
    return BASE + trio.current_time()


def loc(name: str) -> NewRecipient:
    return NewRecipient(f"{name}@example.test", f"{name}@example.test", name)


def rem(address: str) -> NewRecipient:
    return NewRecipient(address, address, None)


def msg(*rcpts: NewRecipient) -> NewMessage:
    return NewMessage("s@example.org", rcpts, DATA)


class Scripted:
    """A delivery agent whose answers the test decides (pure trio, no threads)."""

    def __init__(self, decide: Callable[[DeliveryItem], Outcome] | None = None) -> None:
        self.decide = decide or (lambda item: o("delivered", "250 2.0.0 ok"))
        self.calls: list[tuple[float, list[DeliveryItem]]] = []
        self.called = trio.Event()
        self.gate: trio.Event | None = None  # when set, deliveries wait for it
        self.active = 0
        self.max_active = 0

    async def deliver(self, items: Sequence[DeliveryItem]) -> list[Outcome]:
        self.calls.append((trio.current_time(), list(items)))
        self.called.set()
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            return [self.decide(item) for item in items]
        finally:
            self.active -= 1

    async def wait_calls(self, n: int) -> None:
        while len(self.calls) < n:
            self.called = trio.Event()
            await self.called.wait()


class Recording:
    """Wraps the real MaildirAgent to see the batches it is handed."""

    def __init__(self, inner: MaildirAgent) -> None:
        self.inner = inner
        self.batches: list[list[DeliveryItem]] = []

    async def deliver(self, items: Sequence[DeliveryItem]) -> Sequence[Outcome]:
        self.batches.append(list(items))
        return await self.inner.deliver(items)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    s = QueueStore(tmp_path / "queue.sqlite3")
    yield s
    s.close()


def make(
    store: QueueStore,
    local_agent: DeliveryAgent,
    remote_agent: DeliveryAgent | None = None,
    **kw: object,
) -> Scheduler:
    options: dict[str, object] = dict(
        retry_initial=60.0,
        retry_max=300.0,
        max_age=1000.0,
        concurrency=2,
        clock=vclock,
        rng=random.Random(7),
        store_in_threads=False,
    )
    options.update(kw)
    return Scheduler(store, local_agent=local_agent, remote_agent=remote_agent, **options)  # type: ignore[arg-type]


@asynccontextmanager
async def running(scheduler: Scheduler) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        yield
        nursery.cancel_scope.cancel()


def status(store: QueueStore, message_id: str) -> list[tuple[str, str, int]]:
    info = store.show(message_id)
    assert info is not None
    return [(r.address, r.status, r.attempts) for r in info.recipients]


# -- pure backoff ----------------------------------------------------------------------


def test_backoff_doubles_caps_and_jitters() -> None:
    rng = random.Random(1)
    for attempts, base in [(1, 60), (2, 120), (3, 240), (4, 300), (30, 300), (10_000, 300)]:
        seen = {backoff_delay(attempts, initial=60, maximum=300, rng=rng) for _ in range(50)}
        assert all(0.9 * base <= d <= min(1.1 * base, 300) for d in seen), (attempts, seen)
        assert len(seen) > 1  # jitter spreads retries out


# -- retries and expiry in virtual time ----------------------------------------------------


async def test_retry_schedule_then_expiry(store: QueueStore, autojump_clock: object) -> None:
    store.insert([("M1", msg(loc("alice")))], now=vclock())
    agent = Scripted(lambda item: o("deferred", "4.2.0 mailbox busy"))
    with trio.fail_after(10_000):
        async with running(make(store, agent)):
            while store.list_messages():
                await trio.sleep(1)
    times = [t for t, _ in agent.calls]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Received at 0: retries after ~60, ~120, ~240, then the 300 cap, each ±10%; a retry
    # that would land past max_age (1000) happens at the expiry time itself, and fails.
    assert times[0] == 0
    for n, gap in enumerate(gaps[:-1]):
        base = min(60 * 2**n, 300)
        assert 0.9 * base <= gap <= min(1.1 * base, 300) + 0.01, (gaps, base)
    assert times[-1] == pytest.approx(1000)
    assert len(times) in (6, 7)  # depends on the jitter
    info = store.show("M1")
    assert info is not None
    (rcpt,) = info.recipients
    assert rcpt.status == "failed"
    assert rcpt.attempts == len(times)
    assert rcpt.last is not None
    assert (rcpt.last.status, rcpt.last.stage) == ("4.4.7", "queue")
    assert rcpt.last.text == (
        f"message expired after {len(times)} attempts; last error: 4.2.0 mailbox busy"
    )
    assert [h.outcome.kind for h in rcpt.history] == ["deferred"] * (len(times) - 1) + ["failed"]
    assert store.list_messages() == []


async def test_permanent_failure_is_not_retried(store: QueueStore, autojump_clock: object) -> None:
    store.insert([("M1", msg(loc("alice"), loc("bob")))], now=vclock())
    agent = Scripted(
        lambda item: (
            o("failed", "5.2.0 nope") if item.rcpt.mailbox == "bob" else o("delivered", "2.0.0 ok")
        )
    )
    with trio.fail_after(10_000):
        async with running(make(store, agent)):
            await agent.wait_calls(1)
            await trio.sleep(5000)
    assert len(agent.calls) == 1
    assert status(store, "M1") == [
        ("alice@example.test", "delivered", 1),
        ("bob@example.test", "failed", 1),
    ]


async def test_crashing_agent_defers_and_the_queue_goes_on(
    store: QueueStore, autojump_clock: object
) -> None:
    store.insert([("M1", msg(loc("alice")))], now=vclock())

    class Flaky(Scripted):
        async def deliver(self, items: Sequence[DeliveryItem]) -> list[Outcome]:
            await super().deliver(items)
            if len(self.calls) == 1:
                raise RuntimeError("disk on fire")
            return [] if len(self.calls) == 2 else [o("delivered", "ok")] * len(items)

    agent = Flaky()
    sched = make(store, agent)
    with trio.fail_after(10_000):
        async with running(sched):
            await agent.wait_calls(3)
    assert sched.deferred == 2 and sched.delivered == 1
    assert store.show("M1") is None  # delivered, purged


# -- real delivery ---------------------------------------------------------------------------


async def test_batches_into_maildir_sharing_bodies(store: QueueStore, tmp_path: Path) -> None:
    root = tmp_path / "mail"
    agent = Recording(MaildirAgent(root, "mx.example.test", limiter=trio.CapacityLimiter(4)))
    now = time.time()
    store.insert(
        [(f"M{n:03d}", msg(loc("alice"), loc("bob"), loc(f"u{n % 3}"))) for n in range(100)],
        now=now,
    )
    sched = make(store, agent, clock=time.time, batch_size=64, store_in_threads=True)
    with trio.fail_after(20):
        async with running(sched):
            while sched.delivered < 300:
                await trio.sleep(0.01)
    assert max(len(b) for b in agent.batches) <= 64
    assert len(agent.batches) <= 10
    for name, count in [("alice", 100), ("bob", 100), ("u0", 34), ("u1", 33), ("u2", 33)]:
        assert len(list((root / name / "new").iterdir())) == count
        assert list((root / name / "tmp").iterdir()) == []
    # Within a batch, recipients of one message share one body object: read once.
    shared = 0
    for batch in agent.batches:
        by_message: dict[str, set[int]] = {}
        for item in batch:
            by_message.setdefault(item.rcpt.message_id, set()).add(id(item.data))
        assert all(len(ids) == 1 for ids in by_message.values())
        shared += len(batch) - len(by_message)
    assert shared > 0
    assert store.list_messages() == []
    assert store.leased == 0
    # Folders fsynced once per batch, not once per file.
    assert agent.inner.dirs_synced < agent.inner.files_synced / 4


async def test_steady_trickle_is_gathered_into_batches(
    store: QueueStore, autojump_clock: object
) -> None:
    agent = Scripted()
    sched = make(store, agent, batch_window=0.1)
    with trio.fail_after(10_000):
        async with running(sched):
            for n in range(101):  # one message every 10 ms for a second
                store.insert([(f"M{n:03d}", msg(loc(f"u{n % 7}")))], now=vclock())
                sched.wake()
                await trio.sleep(0.01)
            while sched.delivered < 101:
                await trio.sleep(0.01)
            await trio.sleep(5)  # a quiet spell: the next message goes out at once
            store.insert([("LATE", msg(loc("alice")))], now=vclock())
            quiet = trio.current_time()
            sched.wake()
            await agent.wait_calls(len(agent.calls) + 1)
    times = [t for t, _ in agent.calls]
    assert times[0] == 0  # the first message did not wait
    assert times[-1] == quiet
    assert len(times) <= 15  # ~one batch per 0.1 s instead of 101 single deliveries
    assert all(b - a >= 0.1 - 1e-6 for a, b in itertools.pairwise(times[:-1]))


async def test_startup_recovery_makes_everything_due(
    tmp_path: Path, autojump_clock: object
) -> None:
    path = tmp_path / "queue.sqlite3"
    crashed = QueueStore(path)
    crashed.insert([("M1", msg(loc("alice"))), ("M2", msg(loc("bob")))], now=vclock())
    leased = {r.message_id: r for r in crashed.due(vclock(), 10)}  # both in flight...
    crashed.defer(
        leased["M2"].rcpt_id,
        now=vclock(),
        next_attempt=vclock() + 86400,
        outcome=o("deferred", "4.0.0 x"),
    )
    crashed.close()  # ...when the process died
    store = QueueStore(path)
    agent = Scripted()
    with trio.fail_after(10_000):
        async with running(make(store, agent, retry_max=86400.0, max_age=10 * 86400.0)):
            await agent.wait_calls(1)
            while store.list_messages():
                await trio.sleep(1)
    assert [t for t, _ in agent.calls] == [0.0]  # both at once, not a day later
    assert store.list_messages() == []
    store.close()


# -- wake-ups and polling -------------------------------------------------------------------


async def test_wake_delivers_at_once(store: QueueStore, autojump_clock: object) -> None:
    agent = Scripted()
    sched = make(store, agent, poll_interval=1000.0)
    async with running(sched):
        await trio.sleep(10)
        store.insert([("M1", msg(loc("alice")))], now=vclock())
        sched.wake()
        await agent.wait_calls(1)
        assert trio.current_time() == 10  # not at the next poll (1000)


async def test_flush_from_another_process_is_seen_by_polling(
    store: QueueStore, autojump_clock: object
) -> None:
    agent = Scripted()
    async with running(make(store, agent, poll_interval=1.0)):
        await trio.sleep(5)
        store.insert([("M1", msg(loc("alice")))], now=vclock())
        (r,) = store.due(vclock(), 10)  # as if an earlier attempt had deferred it
        store.defer(
            r.rcpt_id,
            now=vclock(),
            next_attempt=vclock() + 3600,
            outcome=o("deferred", "4.2.0 busy"),
        )
        await trio.sleep(10.5)  # between two polls
        assert agent.calls == []
        cli = QueueStore(store.path)  # `trio-mta queue flush` runs in another process
        flushed_at = trio.current_time()
        assert cli.flush(now=vclock()) == 1
        cli.close()
        await agent.wait_calls(1)
        assert 0 < trio.current_time() - flushed_at <= 1.0  # seen by the next poll


# -- leases and cancellation ----------------------------------------------------------------


async def test_in_flight_recipients_are_never_handed_out_twice(
    store: QueueStore, autojump_clock: object
) -> None:
    store.insert([(f"M{n}", msg(loc("alice"), loc("bob"))) for n in range(5)], now=vclock())
    agent = Scripted()
    agent.gate = trio.Event()
    sched = make(store, agent, batch_size=4, local_batches=2)
    with trio.fail_after(10_000):
        async with running(sched):
            await agent.wait_calls(2)
            for _ in range(20):  # many polls and wake-ups while both batches hang
                sched.wake()
                await trio.sleep(1)
            assert len(agent.calls) == 2  # both slots busy: nothing else handed out
            agent.gate.set()
            while sched.delivered < 10:
                await trio.sleep(1)
    handed = [item.rcpt.rcpt_id for _, items in agent.calls for item in items]
    assert sorted(handed) == sorted(set(handed)) and len(handed) == 10
    assert agent.max_active == 2


async def test_cancelled_delivery_stays_pending(store: QueueStore, autojump_clock: object) -> None:
    store.insert([("M1", msg(loc("alice")))], now=vclock())
    agent = Scripted()
    agent.gate = trio.Event()  # never set: the delivery hangs until cancelled
    async with running(make(store, agent)):
        await agent.wait_calls(1)
    assert status(store, "M1") == [("alice@example.test", "pending", 0)]
    assert store.leased == 0
    # The next run delivers it.
    agent2 = Scripted()
    with trio.fail_after(10_000):
        async with running(make(store, agent2)):
            await agent2.wait_calls(1)
            while store.list_messages():
                await trio.sleep(1)


async def test_results_are_kept_while_the_database_refuses_them(
    tmp_path: Path, autojump_clock: object
) -> None:
    store = QueueStore(tmp_path / "q.sqlite3", busy_timeout=0.02)
    store.insert([("M1", msg(loc("alice")))], now=vclock())
    blocker = sqlite3.connect(store.path, isolation_level=None)

    def lock_then_deliver(item: DeliveryItem) -> Outcome:
        if not agent.calls[1:]:
            blocker.execute("BEGIN IMMEDIATE")  # another writer hogs the database
        return o("delivered", "2.0.0 ok")

    agent = Scripted(lock_then_deliver)
    sched = make(store, agent)
    with trio.fail_after(300):
        async with running(sched):
            await agent.wait_calls(1)
            await trio.sleep(30)  # polls and retries while the lock is held
            assert len(agent.calls) == 1
            assert status(store, "M1") == [("alice@example.test", "pending", 0)]
            blocker.execute("ROLLBACK")
            while store.list_messages():
                await trio.sleep(1)
    assert len(agent.calls) == 1  # recorded late, never delivered again
    assert sched.delivered == 1
    blocker.close()
    store.close()


# -- remote recipients --------------------------------------------------------------------------


async def test_without_remote_agent_remote_recipients_are_untouched(
    store: QueueStore, autojump_clock: object
) -> None:
    store.insert([("M1", msg(loc("alice"), rem("x@remote.test")))], now=vclock())
    before = store.list_messages()[0].recipients[1]
    agent = Scripted()
    with trio.fail_after(10_000):
        async with running(make(store, agent)):
            await agent.wait_calls(1)
            await trio.sleep(2000)
    assert [i.rcpt.address for _, items in agent.calls for i in items] == ["alice@example.test"]
    (row,) = store.list_messages()
    assert row.recipients[1] == before  # still pending, no attempt, same next_attempt
    assert row.recipients[0].status == "delivered"


async def test_remote_agent_gets_one_group_per_message_and_domain(
    store: QueueStore, autojump_clock: object
) -> None:
    store.insert(
        [
            (m, msg(rem("a@r1.test"), rem("b@R1.test"), rem("c@r2.test"), loc("alice")))
            for m in ("M1", "M2")
        ],
        now=vclock(),
    )
    local, remote = Scripted(), Scripted()
    remote.gate = trio.Event()
    sched = make(store, local, remote, concurrency=2)
    with trio.fail_after(10_000):
        async with running(sched):
            await remote.wait_calls(2)
            await trio.sleep(5)
            assert len(remote.calls) == 2  # concurrency 2: the other groups wait
            remote.gate.set()
            while sched.delivered < 8:
                await trio.sleep(1)
    groups = sorted(
        (items[0].rcpt.message_id, sorted(i.rcpt.address for i in items))
        for _, items in remote.calls
    )
    assert groups == [
        ("M1", ["a@r1.test", "b@R1.test"]),
        ("M1", ["c@r2.test"]),
        ("M2", ["a@r1.test", "b@R1.test"]),
        ("M2", ["c@r2.test"]),
    ]
    assert remote.max_active == 2
    assert store.list_messages() == []


class OneSlowDomain(Scripted):
    """A remote agent whose slow.test deliveries wait for the gate; it enforces no limits."""

    def __init__(self) -> None:
        super().__init__()
        self.slow_busy = 0
        self.slow_max = 0
        self.gate = trio.Event()

    async def deliver(self, items: Sequence[DeliveryItem]) -> list[Outcome]:
        slow = items[0].rcpt.address.endswith("@slow.test")
        self.calls.append((trio.current_time(), list(items)))
        self.called.set()
        if not slow:
            return [self.decide(item) for item in items]
        self.slow_busy += 1
        self.slow_max = max(self.slow_max, self.slow_busy)
        try:
            assert self.gate is not None
            await self.gate.wait()
            return [self.decide(item) for item in items]
        finally:
            self.slow_busy -= 1


async def test_a_saturated_destination_does_not_take_every_slot(
    store: QueueStore, autojump_clock: object
) -> None:
    store.insert([(f"S{i}", msg(rem(f"u{i}@slow.test"))) for i in range(4)], now=vclock())
    store.insert([(f"F{i}", msg(rem(f"u{i}@fast.test"))) for i in range(4)], now=vclock() + 1)
    remote = OneSlowDomain()
    sched = make(store, Scripted(), remote, concurrency=3)
    assert sched.per_domain == 1  # half of 3, at least 1
    with trio.fail_after(10_000):
        async with running(sched):
            # slow.test is full after its first message: the fast mail goes meanwhile.
            while sched.delivered < 4:
                await trio.sleep(1)
            slow_calls = [c for c in remote.calls if c[1][0].rcpt.address.endswith("slow.test")]
            assert len(slow_calls) == 1
            polls_before = len(remote.calls)
            await trio.sleep(30)  # while slow.test stays full, the scheduler idles
            assert len(remote.calls) == polls_before
            assert remote.gate is not None
            remote.gate.set()
            while sched.delivered < 8:
                await trio.sleep(1)
    assert remote.slow_max == 1
    assert store.list_messages() == []


async def test_through_a_smarthost_one_destination_may_use_every_slot(
    store: QueueStore, autojump_clock: object
) -> None:
    """Everything goes to one next hop: no per-domain share, one batch per message."""
    store.insert(
        [(f"S{i}", msg(rem(f"u{i}@slow.test"), rem(f"v{i}@other.test"))) for i in range(4)],
        now=vclock(),
    )
    remote = OneSlowDomain()
    sched = make(store, Scripted(), remote, concurrency=3, single_destination=True)
    with trio.fail_after(10_000):
        async with running(sched):
            while remote.slow_busy < 3:
                await trio.sleep(1)
            await trio.sleep(30)
            assert remote.slow_busy == 3  # every slot, and no more
            assert remote.gate is not None
            remote.gate.set()
            while sched.delivered < 8:
                await trio.sleep(1)
    assert remote.slow_max == 3
    assert sorted(len(items) for _, items in remote.calls) == [2, 2, 2, 2]
    assert store.list_messages() == []


class DeletedWhileLeased(QueueStore):
    """A queue whose messages in `doomed` are deleted by `trio-mta queue delete` (another
    connection, as the CLI's) right after the scheduler leased them, before it reads
    their bodies."""

    doomed: set[str]

    def bodies(self, message_ids: Sequence[str]) -> dict[str, StoredBody]:
        for message_id in set(message_ids) & self.doomed:
            cli = QueueStore(self.path)
            assert cli.delete(message_id)
            cli.close()
        return super().bodies(message_ids)


async def test_a_remote_message_deleted_after_its_lease_is_skipped(
    tmp_path: Path, autojump_clock: object
) -> None:
    store = DeletedWhileLeased(tmp_path / "queue.sqlite3")
    store.doomed = {"GONE"}
    store.insert([("GONE", msg(rem("a@remote.test")))], now=vclock())
    remote = Scripted()
    sched = make(store, Scripted(), remote)
    with trio.fail_after(10_000):
        async with running(sched):
            while store.show("GONE") is not None:
                await trio.sleep(1)
            await trio.sleep(5)
            store.insert([("KEPT", msg(rem("b@remote.test")))], now=vclock())
            sched.wake()
            await remote.wait_calls(1)
            while sched.delivered < 1:
                await trio.sleep(1)
    assert [i.rcpt.message_id for _, items in remote.calls for i in items] == ["KEPT"]
    assert store.list_messages() == []
    store.close()
