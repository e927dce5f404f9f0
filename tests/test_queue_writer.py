"""QueueWriter: group commit, IDs only after the commit, failures reported to submitters."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_mta.queue.ids import is_queue_id
from trio_mta.queue.store import NewMessage, NewRecipient, QueueError, QueueStore
from trio_mta.queue.writer import QueueWriter

DATA = b"Subject: hi\r\n\r\nhello\r\n"


def message(n: int = 0) -> NewMessage:
    rcpt = NewRecipient(f"u{n}@example.test", f"u{n}@example.test", f"u{n}")
    return NewMessage("s@example.org", (rcpt,), DATA)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    s = QueueStore(tmp_path / "queue.sqlite3", busy_timeout=0.05)
    yield s
    s.close()


async def test_submit_returns_id_once_committed(store: QueueStore) -> None:
    writer = QueueWriter(store, "TEST")
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        qid = await writer.submit(message())
        assert is_queue_id(qid) and qid.endswith("-TEST")
        # Committed: another connection (another process, say) sees it at once.
        other = QueueStore(store.path, readonly=True)
        assert [row.id for row in other.list_messages()] == [qid]
        other.close()
        assert await writer.submit(message(), queue_id=writer.new_id()) != qid
        nursery.cancel_scope.cancel()


async def test_concurrent_submits_share_few_commits(store: QueueStore) -> None:
    woken = []
    writer = QueueWriter(store, "TEST", on_committed=lambda: woken.append(1))
    ids: list[str] = []

    async def one(n: int) -> None:
        ids.append(await writer.submit(message(n)))

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with trio.open_nursery() as clients:
            for n in range(200):
                clients.start_soon(one, n)
        nursery.cancel_scope.cancel()
    assert len(set(ids)) == 200
    assert writer.messages == 200
    assert writer.commits <= 20, writer.commits  # group commit: one fsync per batch
    assert store.durable_commits == writer.commits
    assert len(woken) == writer.commits
    assert {row.id for row in store.list_messages()} == set(ids)


async def test_max_batch_bounds_a_transaction(store: QueueStore) -> None:
    writer = QueueWriter(store, "TEST", max_batch=8)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with trio.open_nursery() as clients:
            for n in range(64):
                clients.start_soon(writer.submit, message(n))
        nursery.cancel_scope.cancel()
    assert writer.messages == 64
    assert writer.commits >= 8


async def test_failed_commit_raises_queue_error_and_writer_goes_on(store: QueueStore) -> None:
    writer = QueueWriter(store, "TEST")
    blocker = sqlite3.connect(store.path, isolation_level=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past busy_timeout
        with pytest.raises(QueueError):
            await writer.submit(message())
        blocker.execute("ROLLBACK")
        qid = await writer.submit(message())
        nursery.cancel_scope.cancel()
    blocker.close()
    assert [row.id for row in store.list_messages()] == [qid]
    assert writer.messages == 1


async def test_submit_after_writer_stopped_raises(store: QueueStore) -> None:
    writer = QueueWriter(store, "TEST")
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        nursery.cancel_scope.cancel()
    with pytest.raises(QueueError):
        await writer.submit(message())


async def test_waiting_submitters_fail_when_writer_is_cancelled(store: QueueStore) -> None:
    writer = QueueWriter(store, "TEST")
    errors: list[QueueError] = []

    async def submit() -> None:
        try:
            await writer.submit(message())
        except QueueError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit)
        await trio.testing.wait_all_tasks_blocked()  # queued in the channel, waiting
        with trio.CancelScope() as scope:
            scope.cancel()
            await writer.run()
    assert len(errors) == 1
    assert store.list_messages() == []
