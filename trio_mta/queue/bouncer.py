"""Turning failed recipients into one delivery status notification per message.

A message is bounced once it is *finished* (no recipient pending or deferred)
and has failures, so a message to three domains of which one fails produces
one DSN listing exactly that recipient. The DSN goes back into the same queue
from the null sender, and the original leaves the queue in the same fsynced
transaction: a crash can neither lose the bounce nor send it twice. Null
senders never get a bounce (RFC 5321 §6.1: no bounce for a bounce).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from trio_mta import log
from trio_mta.queue.dsn import FailedRecipient, build_bounce, needs_bounce
from trio_mta.queue.ids import new_queue_id
from trio_mta.queue.store import (
    FailedRecord,
    FinishedMessage,
    NewMessage,
    NewRecipient,
    QueueError,
    QueueStore,
)
from trio_mta.routing.router import LocalTarget, Router


def failed_recipient(record: FailedRecord) -> FailedRecipient:
    """A failed recipient's DSN fields, straight from its recorded outcome.

    A server's reply is quoted as ``smtp; <code> <status> <text>`` with the
    server as Remote-MTA (RFC 3464 §2.3.5-6); our own findings (DNS, expiry,
    an unreachable host) are worded as ours.
    """
    outcome = record.outcome
    # A failure can only carry a failure's status; "2.x.x" would contradict Action.
    status = outcome.status if outcome.status[0] in "45" else "5.0.0"
    return FailedRecipient(
        address=record.address,
        original=record.original if record.original.lower() != record.address.lower() else None,
        status=status,
        diagnostic=(outcome.reply if outcome.code is not None else outcome.text) or None,
        remote_mta=outcome.remote_host if outcome.code is not None else None,
        last_attempt=record.failed_at,
        smtp_reply=outcome.code is not None,
    )


class Bouncer:
    """Background task: finished messages with failures become DSNs."""

    def __init__(self, store: QueueStore, router: Router, *, hostname: str, host_tag: str,
                 on_queued: Callable[[], None] | None = None,
                 poll_interval: float = 1.0) -> None:
        self.store = store
        self.router = router
        self.hostname = hostname
        self.host_tag = host_tag
        self.on_queued = on_queued
        self.poll_interval = poll_interval
        self.sent = 0
        self._wakeup = trio.Event()

    def kick(self) -> None:
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                candidates = await trio.to_thread.run_sync(self.store.bounce_candidates)
                for message in candidates:
                    await self._settle(message)
            except QueueError as exc:
                log.error("bounce.queue_error", error=str(exc))
            with trio.move_on_after(self.poll_interval):
                await self._wakeup.wait()
            self._wakeup = trio.Event()

    def _recipients(self, sender: str) -> tuple[NewRecipient, ...]:
        targets = self.router.expand(sender)
        if not targets and self.router.domains:
            # An unroutable bounce goes to the postmaster (a "double bounce").
            targets = self.router.expand(f"postmaster@{self.router.domains[0]}")
        return tuple(
            NewRecipient(address=t.address, original=sender,
                         mailbox=t.mailbox if isinstance(t, LocalTarget) else None)
            for t in targets)

    async def _settle(self, message: FinishedMessage) -> None:
        now = time.time()
        failed = [failed_recipient(r) for r in message.failed]
        if not needs_bounce(message.sender):
            await trio.to_thread.run_sync(
                lambda: self.store.settle(message.message_id, None, now=now))
            log.event("bounce.suppressed", id=message.message_id, reason="null sender",
                      failed=len(failed))
            return
        dsn = build_bounce(reporting_mta=self.hostname, sender=message.sender,
                           queue_id=message.message_id, arrival=message.received_at,
                           recipients=failed, original=message.data, now=now)
        recipients = self._recipients(message.sender)
        bounce_id = new_queue_id(self.host_tag)
        bounce = NewMessage(sender="", recipients=recipients, data=dsn,
                            meta={"bounce_of": message.message_id})
        await trio.to_thread.run_sync(
            lambda: self.store.settle(message.message_id,
                                      (bounce_id, bounce) if recipients else None, now=now))
        self.sent += 1
        log.event("bounce.queued" if recipients else "bounce.undeliverable",
                  id=message.message_id, bounce_id=bounce_id, to=message.sender,
                  failed=",".join(r.address for r in failed))
        if self.on_queued is not None:
            self.on_queued()
