"""The end of DATA with milters: run the chain, then apply its verdict to the message.

Kept apart from server/session.py so the session makes one call: it gets
back either the reply to give (refused, tempfailed, discarded) or the
envelope and content to hand to the sink, rewritten when a milter changed
the sender, the recipients, a header or the body.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from trio_mta import log
from trio_mta.milter.chain import EndOfMessage, MilterChain
from trio_mta.milter.message import MilterMessage
from trio_mta.queue.bodies import MessageContent, SpooledBody
from trio_mta.queue.spool import Spool
from trio_mta.routing.router import Router
from trio_mta.server.envelope import Envelope, Recipient
from trio_mta.smtp import Reply, parse_path
from trio_mta.smtp.errors import CommandError


@dataclass
class Accepted:
    """Hand this to the sink; ``spool`` (if any) is the rewritten body's, to discard after."""

    envelope: Envelope
    content: MessageContent
    spool: Spool | None = None


async def run_milters(
    chain: MilterChain,
    envelope: Envelope,
    content: MessageContent,
    first: bytes,
    queue_id: str,
    router: Router,
    new_spool: Callable[[], Spool],
) -> Reply | Accepted:
    """``first``: the first bytes of a spooled body; ``new_spool`` makes the
    spool a rewritten message is written to."""
    body = content.body
    if isinstance(body, SpooledBody):
        message = MilterMessage.from_parts(content.head, None, body.path, first)
    else:
        message = MilterMessage.from_parts(content.head, body, None)
    macros = {"i": queue_id, "{mail_addr}": envelope.sender_address}
    outcome = await chain.end_of_message(message, macros)
    if outcome.reply is not None:
        return outcome.reply
    if outcome.discard:
        log.event(
            "milter.discard",
            id=queue_id,
            sender=envelope.sender_address,
            nrcpt=len(envelope.recipients),
        )
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
    envelope = _envelope(envelope, outcome, router, queue_id)
    if not envelope.recipients:
        log.event("milter.discard", id=queue_id, reason="no recipients left")
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
    if outcome.message is None:
        return Accepted(envelope, content)
    spool = new_spool()
    try:
        chunks = outcome.message.chunks()
        while True:
            chunk = (
                next(chunks, None)
                if outcome.message.path is None
                else await trio.to_thread.run_sync(next, chunks, None)
            )
            if chunk is None:
                break
            await spool.write(chunk)
        rewritten = await spool.finish()
    except OSError as exc:
        spool.discard()
        log.error("milter.rewrite_failed", id=queue_id, error=str(exc))
        return Reply(451, "4.3.0", "Error: queue file write error, try again later")
    return Accepted(envelope, MessageContent(b"", rewritten), spool)


def _envelope(envelope: Envelope, outcome: EndOfMessage, router: Router, queue_id: str) -> Envelope:
    sender = envelope.sender
    if outcome.sender is not None:
        try:
            sender = parse_path(f"<{outcome.sender}>", smtputf8=True, allow_null=True)
        except CommandError:
            log.warning("milter.bad_sender", id=queue_id, sender=outcome.sender)
    recipients = list(envelope.recipients)
    if outcome.delete_rcpts:
        gone = {a.lower() for a in outcome.delete_rcpts}
        recipients = [r for r in recipients if r.address.lower() not in gone]
    for address in outcome.add_rcpts:
        targets = router.expand(address)
        if targets:
            recipients.append(Recipient(address, targets))
        else:
            log.warning("milter.unroutable_rcpt", id=queue_id, rcpt=address)
    if sender is envelope.sender and recipients == envelope.recipients:
        return envelope
    return replace(envelope, sender=sender, recipients=recipients)
