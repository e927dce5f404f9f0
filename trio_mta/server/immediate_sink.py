"""The default sink: local recipients into their Maildir before the 250, the rest queued.

A file that is written to ``tmp/``, fsynced, renamed into ``new/`` and whose
``new/`` folder is fsynced is exactly as durable as a queue row, so for local
recipients the queue is a detour: an insert, a due query, a status update and a
purge per message, each behind a thread round trip. This sink delivers them at
the end of DATA and answers ``250`` only after every file and folder is
fsynced; what it could not deliver (a full disk, a mailbox that cannot be
written, a name that is refused) and every remote recipient go to the durable
queue as before, in the same reply. Nothing is acknowledged before it is on
stable storage either way.

Deliveries from many sessions are gathered into one batch, as the queue writer
gathers commits: while one batch's files are being fsynced the next piles up,
and each ``new/`` folder is fsynced once per batch whatever the number of
messages in it.

If the queue refuses the remainder after some recipients were delivered, the
client gets a ``451`` and sends again: those recipients get a second copy,
never none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from trio_mta import log
from trio_mta.delivery.agent import DeliveryItem
from trio_mta.delivery.maildir import MaildirAgent
from trio_mta.delivery.outcome import Outcome
from trio_mta.queue.bodies import MessageContent, StoredBody
from trio_mta.queue.store import DueRecipient, NewRecipient, wants
from trio_mta.server.envelope import Envelope, SessionInfo
from trio_mta.server.queue_sink import QueueSink, queue_recipients
from trio_mta.smtp import Reply

__all__ = ["ImmediateLocalDelivery"]


@dataclass(eq=False)
class _Request:
    items: list[DeliveryItem]
    done: trio.Event = field(default_factory=trio.Event)
    outcomes: Sequence[Outcome] = ()


class ImmediateLocalDelivery:
    """A message sink: local recipients into Maildir at once, the rest into ``queue``."""

    def __init__(
        self,
        agent: MaildirAgent,
        queue: QueueSink,
        *,
        on_outcome: Callable[[DueRecipient, str, float], None] | None = None,
        max_batch: int = 128,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.agent = agent
        self.queue = queue
        self.on_outcome = on_outcome
        self.max_batch = max_batch
        self.batches = 0  # for tests and the benchmark
        self.delivered = 0
        self._send, self._receive = trio.open_memory_channel[_Request](max_batch * 4)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver batches until cancelled; requests left over then fall back to the queue."""
        task_status.started()
        try:
            async for first in self._receive:
                batch = [first]
                waiting = len(first.items)
                while waiting < self.max_batch:
                    try:
                        request = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    batch.append(request)
                    waiting += len(request.items)
                await self._deliver(batch)
        finally:
            while True:
                try:
                    request = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                    break
                request.done.set()  # no outcomes: the caller queues every recipient
            self._receive.close()

    async def _deliver(self, batch: list[_Request]) -> None:
        items = [item for request in batch for item in request.items]
        try:
            # Not cancellable once started (the agent's thread work is not): every
            # request of a batch whose files may be in new/ hears how it went.
            with trio.CancelScope(shield=True):
                outcomes = await self.agent.deliver(items)
        finally:
            self.batches += 1
        start = 0
        for request in batch:
            request.outcomes = outcomes[start : start + len(request.items)]
            start += len(request.items)
            request.done.set()

    async def accept(
        self, envelope: Envelope, session: SessionInfo, content: MessageContent, queue_id: str
    ) -> Reply:
        if any(not rcpt.targets for rcpt in envelope.recipients):
            return await self.queue.accept(envelope, session, content, queue_id)
        recipients = queue_recipients(envelope)
        # NOTIFY=SUCCESS recipients take the queue, whose bouncer sends the success
        # DSN (RFC 3461 §6.2) once they are delivered; the rest need no report.
        local = [r for r in recipients if r.mailbox is not None and not wants(r.notify, "SUCCESS")]
        if not local:
            return await self.queue.accept(envelope, session, content, queue_id)
        now = time.time()
        body: bytes | StoredBody
        if isinstance(content.body, bytes):
            body = content.head + content.body
        else:
            body = StoredBody(content.head, content.body.path, content.body.size)
        items = [
            DeliveryItem(
                DueRecipient(
                    message_id=queue_id,
                    rcpt_id=index,
                    address=r.address,
                    original=r.original,
                    mailbox=r.mailbox,
                    sender=envelope.sender_address,
                    attempts=0,
                    received_at=now,
                ),
                body,
            )
            for index, r in enumerate(local)
        ]
        request = _Request(items)
        try:
            await self._send.send(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return await self.queue.accept(envelope, session, content, queue_id)
        await request.done.wait()
        left = self._record(items, request.outcomes, local)
        remaining = [r for r in recipients if r not in local] + left
        if not remaining:
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        return await self.queue.accept(
            envelope, session, content, queue_id, recipients=tuple(remaining)
        )

    def _record(
        self, items: list[DeliveryItem], outcomes: Sequence[Outcome], origin: Sequence[NewRecipient]
    ) -> list[NewRecipient]:
        """Log what was delivered (as the scheduler does) and return what the queue must take."""
        left: list[NewRecipient] = []
        now = time.time()
        for index, item in enumerate(items):
            rcpt = item.rcpt
            outcome = outcomes[index] if index < len(outcomes) else None
            if outcome is not None and outcome.kind == "delivered":
                self.delivered += 1
                log.event(
                    "queue.delivered",
                    id=rcpt.message_id,
                    to=rcpt.address,
                    mailbox=rcpt.mailbox,
                    attempts=1,
                    detail=outcome.detail,
                )
                if self.on_outcome is not None:
                    self.on_outcome(rcpt, "delivered", now)
                continue
            if outcome is not None:
                log.warning(
                    "queue.deferred",
                    id=rcpt.message_id,
                    to=rcpt.address,
                    mailbox=rcpt.mailbox,
                    attempts=1,
                    detail=outcome.detail,
                    next_attempt="queued",
                )
            left.append(origin[index])
        return left
