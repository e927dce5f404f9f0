"""Local delivery over LMTP (RFC 2033) into a mail store such as Dovecot (SPEC §11).

With ``[local] lmtp`` set, local recipients are handed to the LMTP server
instead of being written to Maildir: the store then owns quotas, sieve
filters and indexes. One session per batch: LHLO once, then per message
MAIL, one RCPT per recipient and DATA, answered by one reply per accepted
recipient after the data. Each reply becomes that recipient's outcome: 2xx
delivered, 4xx deferred (retried), 5xx failed (bounced). A session that
cannot be had (connection refused, refused greeting or LHLO, a lost
connection) defers every recipient it did not finish.

RCPT names the recipient by its mailbox (what routing resolved aliases and
the mailbox map to) at the address's domain, so the store sees the same user
a Maildir folder would have been named after; Dovecot's
``auth_username_format = %Ln`` strips the domain (docs/dovecot.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from trio_mta import log
from trio_mta.client.connection import SMTPClient, SMTPClientError, Timeouts
from trio_mta.delivery.agent import DeliveryItem
from trio_mta.delivery.outcome import Kind, Outcome, Stage
from trio_mta.smtp.client import TransactionResult
from trio_mta.smtp.replies import Reply

__all__ = ["LMTPAgent"]


class LMTPAgent:
    """DeliveryAgent for local mailboxes behind an LMTP server at ``target``.

    ``target`` is ``host:port`` or ``unix:/path``; ``hostname`` is what LHLO says.
    """

    def __init__(self, target: str, hostname: str, *, timeouts: Timeouts | None = None) -> None:
        self.target = target
        self.hostname = hostname
        self._timeouts = timeouts or Timeouts()

    async def deliver(self, items: Sequence[DeliveryItem]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(items)
        messages: dict[str, list[int]] = {}  # message id -> its items, in batch order
        for i, item in enumerate(items):
            if item.rcpt.mailbox is None:
                outcomes[i] = Outcome("failed", "5.3.5", "not a local mailbox", stage="local")
            else:
                messages.setdefault(item.rcpt.message_id, []).append(i)
        if not messages:
            return [o for o in outcomes if o is not None]
        try:
            client = await SMTPClient.connect_lmtp(
                self.target, helo_name=self.hostname, timeouts=self._timeouts
            )
        except SMTPClientError as exc:
            failure = self._session_failure(exc)
            return [o if o is not None else failure for o in outcomes]
        try:
            for indexes in messages.values():
                if not client.usable:
                    break
                first = items[indexes[0]]
                data = await _message_data(first)
                recipients = [_lmtp_recipient(items[i]) for i in indexes]
                try:
                    result = await client.send(first.rcpt.sender, recipients, data)
                except ValueError as exc:  # an address the client machine refuses to send
                    for i in indexes:
                        outcomes[i] = Outcome("failed", "5.1.3", str(exc), stage="rcpt")
                    continue
                except SMTPClientError as exc:
                    log.event("lmtp.session_lost", target=self.target, error=str(exc))
                    break
                for i, reply, stage in zip(indexes, result.outcomes, _stages(result), strict=True):
                    outcomes[i] = self._outcome(reply, client.address, stage)
        finally:
            await client.quit()
        lost = Outcome(
            "deferred",
            "4.4.2",
            "LMTP session ended before delivery",
            remote_host=self.target,
            stage="data",
        )
        return [o if o is not None else lost for o in outcomes]

    def _outcome(self, reply: Reply, address: str, stage: Stage) -> Outcome:
        kind: Kind = (
            "delivered" if reply.is_success else "failed" if reply.code >= 500 else "deferred"
        )
        default = {"delivered": "2.0.0", "deferred": "4.0.0", "failed": "5.0.0"}[kind]
        status = reply.status if reply.status and reply.status[0] == default[0] else default
        return Outcome(kind, status, reply.text, reply.code, "lmtp", address, stage)

    def _session_failure(self, exc: SMTPClientError) -> Outcome:
        """No session: every recipient waits for the next attempt, whatever was said."""
        status = exc.status if exc.status[:1] == "4" else "4.0.0"
        stage: Stage = (
            "connect" if exc.stage is None else ("greeting" if exc.stage == "greeting" else "ehlo")
        )
        if exc.reply is not None:
            return Outcome(
                "deferred", status, exc.reply.text, exc.reply.code, "lmtp", self.target, stage
            )
        return Outcome(
            "deferred",
            status,
            str(exc),
            remote_host="lmtp",
            remote_address=self.target,
            stage=stage,
        )


def _lmtp_recipient(item: DeliveryItem) -> str:
    rcpt = item.rcpt
    _, at, domain = rcpt.address.rpartition("@")
    return f"{rcpt.mailbox}@{domain}" if at else str(rcpt.mailbox)


async def _message_data(item: DeliveryItem) -> bytes:
    if item.stored.path is None:
        return item.stored.head
    return await trio.to_thread.run_sync(lambda: item.data)


def _stages(result: TransactionResult) -> list[Stage]:
    """Per recipient, the step whose reply decided it."""
    out: list[Stage] = []
    for i, rcpt in enumerate(result.rcpt_replies):
        if result.data_replies and result.data_replies[i] is not None:
            out.append("data")
        elif not result.mail_reply.is_success or rcpt is None:
            out.append("mail")
        elif not rcpt.is_success or result.data_reply is None:
            out.append("rcpt")
        else:
            out.append("data")
    return out
