"""Group commit: one task turns many concurrent submissions into one fsync.

Every session that finished DATA calls `submit`, which puts the message on a
memory channel and waits. The writer task takes everything waiting in the
channel, inserts it in ONE SQLite transaction (synchronous=FULL, one WAL fsync)
in a worker thread, and only then wakes each submitter with its queue ID. While
that fsync runs the next batch piles up, so under load the number of fsyncs per
message falls well below one. SPEC §4: 250 is sent only after this returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from trio_mta import log
from trio_mta.queue.ids import new_queue_id
from trio_mta.queue.store import NewMessage, QueueError, QueueStore


@dataclass(eq=False)
class _Submission:
    queue_id: str
    message: NewMessage
    done: trio.Event = field(default_factory=trio.Event)
    error: QueueError | None = None


class QueueWriter:
    """Commits accepted messages in batches; see the module doc."""

    def __init__(
        self,
        store: QueueStore,
        host_tag: str,
        *,
        limiter: trio.CapacityLimiter | None = None,
        max_batch: int = 256,
        on_committed: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.store = store
        self.host_tag = host_tag
        self.max_batch = max_batch
        self.on_committed = on_committed  # e.g. Scheduler.wake: deliver new mail at once
        self.commits = 0  # transactions committed (= WAL fsyncs for inserts)
        self.messages = 0  # messages committed
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(1)
        self._send, self._receive = trio.open_memory_channel[_Submission](max_batch * 4)

    def new_id(self) -> str:
        """A fresh queue ID, for sessions that must name it (Received:) before submitting."""
        return new_queue_id(self.host_tag)

    async def submit(self, message: NewMessage, *, queue_id: str | None = None) -> str:
        """Queue `message`; returns its ID once it is on stable storage.

        Raises QueueError when the commit failed or the writer is not running (the
        session then answers 451 4.3.0). If the caller is cancelled while waiting,
        the message may still be committed and delivered: a duplicate, never a loss.
        """
        sub = _Submission(queue_id or self.new_id(), message)
        try:
            await self._send.send(sub)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise QueueError("queue writer is not running") from exc
        await sub.done.wait()
        if sub.error is not None:
            raise sub.error
        return sub.queue_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit batches until cancelled; submissions left over then get QueueError."""
        task_status.started()
        try:
            async for first in self._receive:
                batch = [first]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._commit(batch)
        finally:
            # Drain, then close with no checkpoint in between: nobody is left waiting.
            stopped = QueueError("queue writer stopped")
            while True:
                try:
                    sub = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                    break
                sub.error = stopped
                sub.done.set()
            self._receive.close()

    async def _commit(self, batch: list[_Submission]) -> None:
        items = [(sub.queue_id, sub.message) for sub in batch]
        error: QueueError | None = None
        try:
            # Not cancellable (abandon_on_cancel=False): a batch whose fsync has
            # started is always reported to its submitters.
            await trio.to_thread.run_sync(
                lambda: self.store.insert(items, now=time.time()), limiter=self._limiter
            )
        except QueueError as exc:
            log.error("queue.commit_failed", messages=len(batch), error=str(exc))
            error = exc
        else:
            self.commits += 1
            self.messages += len(batch)
        for sub in batch:
            sub.error = error
            sub.done.set()
        if error is None and self.on_committed is not None:
            self.on_committed()
