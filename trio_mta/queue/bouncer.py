"""Turning failed recipients into one delivery status notification per message.

A message is bounced once it is *finished* (no recipient pending or deferred)
and has failures, so a message to three domains of which one fails produces
one DSN listing exactly that recipient. The DSN goes back into the same queue
from the null sender, and the original leaves the queue in the same fsynced
transaction: a crash can neither lose the bounce nor send it twice. Null
senders never get a bounce (RFC 5321 §6.1: no bounce for a bounce).

RFC 3461 requests shape the report: a recipient with NOTIFY=NEVER (or a
NOTIFY without FAILURE) is left out of it, one with SUCCESS is reported as
``delivered`` or ``relayed`` in the same report, and one with DELAY gets one
``delayed`` notice once it has waited ``delay_warning``. ENVID and ORCPT are
echoed; RET=FULL returns the whole message (within the size cap), otherwise
only its headers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from trio_mta import log
from trio_mta.queue.dsn import FailedRecipient, build_bounce, needs_bounce
from trio_mta.queue.ids import new_queue_id
from trio_mta.queue.store import (
    DelayedMessage,
    FailedRecord,
    FinishedMessage,
    NewMessage,
    NewRecipient,
    NoticeRecord,
    QueueError,
    QueueStore,
    wants,
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
        orcpt=record.orcpt,
    )


def notice_recipient(record: NoticeRecord) -> FailedRecipient:
    """A success notice's DSN fields (RFC 3464 §2.3.3 ``delivered`` / ``relayed``)."""
    return FailedRecipient(
        address=record.address,
        original=record.original if record.original.lower() != record.address.lower() else None,
        status="2.0.0",
        diagnostic=None,
        remote_mta=None,
        last_attempt=record.delivered_at,
        action=record.action,
        orcpt=record.orcpt,
    )


class Bouncer:
    """Background task: finished messages with failures become DSNs."""

    def __init__(
        self,
        store: QueueStore,
        router: Router,
        *,
        hostname: str,
        host_tag: str,
        on_queued: Callable[[], None] | None = None,
        poll_interval: float = 1.0,
        delay_warning: float | None = None,
    ) -> None:
        self.store = store
        self.router = router
        self.hostname = hostname
        self.host_tag = host_tag
        self.on_queued = on_queued
        self.poll_interval = poll_interval
        # Seconds after which NOTIFY=DELAY recipients get their one delay notice.
        self.delay_warning = delay_warning
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
                if self.delay_warning is not None:
                    older_than = time.time() - self.delay_warning
                    delayed = await trio.to_thread.run_sync(self.store.delay_candidates, older_than)
                    for late in delayed:
                        await self._warn(late)
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
            NewRecipient(
                address=t.address,
                original=sender,
                mailbox=t.mailbox if isinstance(t, LocalTarget) else None,
            )
            for t in targets
        )

    async def _settle(self, message: FinishedMessage) -> None:
        now = time.time()
        failed = [failed_recipient(r) for r in message.failed if wants(r.notify, "FAILURE")]
        notices = [notice_recipient(r) for r in message.notices]
        reason = None
        if not needs_bounce(message.sender):
            reason = "null sender"
        elif not failed and not notices:
            reason = "NOTIFY"  # RFC 3461 §4.1: NEVER, or a NOTIFY without FAILURE
        if reason is not None:
            await trio.to_thread.run_sync(
                lambda: self.store.settle(message.message_id, None, now=now)
            )
            log.event(
                "bounce.suppressed",
                id=message.message_id,
                reason=reason,
                failed=len(message.failed),
            )
            return
        dsn = build_bounce(
            reporting_mta=self.hostname,
            sender=message.sender,
            queue_id=message.message_id,
            arrival=message.received_at,
            recipients=[*failed, *notices],
            original=message.data,
            now=now,
            return_full_message=message.ret == "FULL",
            envid=message.envid,
        )
        recipients = self._recipients(message.sender)
        bounce_id = new_queue_id(self.host_tag)
        bounce = NewMessage(
            sender="", recipients=recipients, data=dsn, meta={"bounce_of": message.message_id}
        )
        await trio.to_thread.run_sync(
            lambda: self.store.settle(
                message.message_id, (bounce_id, bounce) if recipients else None, now=now
            )
        )
        self.sent += 1
        log.event(
            "bounce.queued" if recipients else "bounce.undeliverable",
            id=message.message_id,
            bounce_id=bounce_id,
            to=message.sender,
            failed=",".join(r.address for r in failed),
            notified=",".join(r.address for r in notices),
        )
        if self.on_queued is not None:
            self.on_queued()

    async def _warn(self, message: DelayedMessage) -> None:
        """One ``delayed`` DSN for the recipients that asked for it (RFC 3461 §4.1)."""
        now = time.time()
        rcpt_ids = [r.rcpt_id for r in message.delayed]
        notice = None
        recipients: tuple[NewRecipient, ...] = ()
        if needs_bounce(message.sender):
            delayed = [
                FailedRecipient(
                    address=r.address,
                    original=r.original if r.original.lower() != r.address.lower() else None,
                    status=r.last.status
                    if r.last is not None and r.last.status[0] == "4"
                    else "4.0.0",
                    diagnostic=(r.last.reply if r.last.code is not None else r.last.text)
                    if r.last is not None
                    else None,
                    remote_mta=r.last.remote_host
                    if r.last is not None and r.last.code is not None
                    else None,
                    last_attempt=r.updated_at if r.last is not None else None,
                    action="delayed",
                    smtp_reply=r.last is not None and r.last.code is not None,
                    orcpt=r.orcpt,
                )
                for r in message.delayed
            ]
            dsn = build_bounce(
                reporting_mta=self.hostname,
                sender=message.sender,
                queue_id=message.message_id,
                arrival=message.received_at,
                recipients=delayed,
                original=message.data,
                now=now,
                envid=message.envid,
            )
            recipients = self._recipients(message.sender)
            if recipients:
                notice = (
                    new_queue_id(self.host_tag),
                    NewMessage(
                        sender="",
                        recipients=recipients,
                        data=dsn,
                        meta={"delay_of": message.message_id},
                    ),
                )
        await trio.to_thread.run_sync(lambda: self.store.warned(rcpt_ids, notice, now=now))
        log.event(
            "bounce.delay_warning",
            id=message.message_id,
            to=message.sender,
            delayed=",".join(r.address for r in message.delayed),
            bounce_id=notice[0] if notice else "",
        )
        if notice is not None and self.on_queued is not None:
            self.on_queued()
