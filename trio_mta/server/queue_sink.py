"""The default sink: accepted messages go into the durable queue.

The reply to the end of DATA is only ``250`` once the queue writer reports
the batch holding this message as fsynced (SPEC §4): nothing is acknowledged
before it is durable.
"""

from __future__ import annotations

from trio_mta import log
from trio_mta.queue.bodies import MessageContent
from trio_mta.queue.store import NewMessage, NewRecipient, QueueError
from trio_mta.queue.writer import QueueWriter
from trio_mta.routing.router import LocalTarget
from trio_mta.server.envelope import Envelope, SessionInfo
from trio_mta.smtp import Reply


def queue_recipients(envelope: Envelope) -> tuple[NewRecipient, ...]:
    """Final delivery targets, one per mailbox or remote address (SPEC §5: one copy each)."""
    seen: set[tuple[str, str | None]] = set()
    out: list[NewRecipient] = []
    for rcpt in envelope.recipients:
        for target in rcpt.targets:
            mailbox = target.mailbox if isinstance(target, LocalTarget) else None
            key = (mailbox or target.address.lower(), mailbox)
            if key in seen:
                continue
            seen.add(key)
            out.append(
                NewRecipient(
                    address=target.address,
                    original=rcpt.address,
                    mailbox=mailbox,
                    notify=rcpt.params.notify,
                    orcpt=rcpt.params.orcpt,
                )
            )
    return tuple(out)


class QueueSink:
    def __init__(self, writer: QueueWriter) -> None:
        self.writer = writer

    async def accept(
        self,
        envelope: Envelope,
        session: SessionInfo,
        content: MessageContent,
        queue_id: str,
        *,
        recipients: tuple[NewRecipient, ...] | None = None,
    ) -> Reply:
        """Queue the message for ``recipients`` (default: every target of the envelope)."""
        unroutable = [r.address for r in envelope.recipients if not r.targets]
        if unroutable:
            # Only possible when an application's handle_rcpt accepted an address
            # routing cannot deliver and handle_message then declined the message:
            # queueing it would acknowledge mail that can never arrive.
            log.error("queue.unroutable", id=queue_id, rcpt=",".join(unroutable))
            return Reply(550, "5.1.1", f"<{unroutable[0]}>: Recipient address has no mailbox here")
        meta = {
            "client_ip": session.client_ip,
            "helo": session.helo or "",
            "listener": session.listener_mode,
            "tls": session.tls or "",
            "auth_user": session.auth_user or "",
        }
        # A small body goes inline in the index row; a spooled one is renamed into
        # the queue's bodies/ by the writer, so only the trace headers are copied.
        body = content.body
        if isinstance(body, bytes):
            data, spooled = content.head + body, None
        else:
            data, spooled = content.head, body
        message = NewMessage(
            sender=envelope.sender_address,
            recipients=recipients or queue_recipients(envelope),
            data=data,
            meta=meta,
            spooled=spooled,
            ret=envelope.params.ret,
            envid=envelope.params.envid,
        )
        try:
            await self.writer.submit(message, queue_id=queue_id)
        except QueueError as exc:
            log.error("queue.commit_failed", id=queue_id, error=str(exc))
            return Reply(451, "4.3.0", "Error: queue file write error, try again later")
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
