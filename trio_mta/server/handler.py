"""The handler API: an application receives mail itself, on trio.

The shape is aiosmtpd's (optional async hooks, a per-connection session and
a per-transaction envelope) so embedders feel at home, but the hooks run in
the server's trio tasks and a message reaches ``handle_message`` only after
the protocol machine has checked its framing, size and line endings.

A hook's return value decides the reply: a :class:`Reply`, a string such as
``"550 5.1.1 no such user"``, or ``None`` for the server's own behaviour
(routing at RCPT; the durable queue at end of DATA, or a plain ``250`` when
the server runs without a queue, a temporary refusal: nothing is ever
acknowledged and then dropped).
"""

from __future__ import annotations

from collections.abc import Awaitable

import trio

from trio_mta import log
from trio_mta.queue.bodies import MessageContent
from trio_mta.server.envelope import Envelope, MessageSink, Recipient, SessionInfo
from trio_mta.smtp import Reply, ReplyParser, SMTPProtocolError

__all__ = ["Envelope", "Handler", "HandlerSink", "Recipient", "SessionInfo", "as_reply"]

HookResult = Reply | str | None


class Handler:
    """Subclass and override what you need; the defaults keep the server's behaviour."""

    async def handle_rcpt(
        self, session: SessionInfo, envelope: Envelope, address: str
    ) -> HookResult:
        """Decide one recipient. ``None``: the configured routing decides."""
        return None

    async def handle_message(
        self, session: SessionInfo, envelope: Envelope, data: bytes
    ) -> HookResult:
        """Take a complete message (CRLF line ends, trace headers already added).

        ``None``: deliver it as usual (queue it). A 2xx reply means the
        application owns the message now; 4xx/5xx refuse it.
        """
        return None


def as_reply(result: Reply | str) -> Reply:
    """Turn a hook's string answer (``"451 4.3.0 try later"``) into a Reply."""
    if isinstance(result, Reply):
        return result
    parser = ReplyParser()
    try:
        parser.feed(result.encode("utf-8") + b"\r\n")
        reply = parser.next_reply()
    except SMTPProtocolError:
        reply = None
    if reply is None:
        raise ValueError(f"handler returned an invalid SMTP reply: {result!r}")
    return reply


async def guarded_hook(call: Awaitable[HookResult], hook: str) -> HookResult:
    """Run an application hook; a crash or a malformed answer becomes 451, not a dropped
    connection, and the client retries later (the message is never half-accepted)."""
    try:
        result = await call
        return None if result is None else as_reply(result)
    except Exception as exc:
        log.error("handler.error", hook=hook, error=f"{type(exc).__name__}: {exc}")
        return Reply(451, "4.3.0", "Error: local processing failed, try again later")


class HandlerSink:
    """MessageSink that asks the application first and falls back to ``fallback``."""

    def __init__(self, handler: Handler, fallback: MessageSink | None) -> None:
        self.handler = handler
        self.fallback = fallback

    async def accept(
        self, envelope: Envelope, session: SessionInfo, content: MessageContent, queue_id: str
    ) -> Reply:
        # The hook takes bytes: a spooled body is read back (in a thread) for it.
        data = await trio.to_thread.run_sync(content.read)
        result = await guarded_hook(
            self.handler.handle_message(session, envelope, data), "handle_message"
        )
        del data
        if result is not None:
            return as_reply(result)
        if self.fallback is not None:
            return await self.fallback.accept(envelope, session, content, queue_id)
        # No queue to fall back on: acknowledging would lose the message.
        log.error("handler.no_destination", id=queue_id, sender=envelope.sender_address)
        return Reply(451, "4.3.0", "Error: no destination for this message, try again later")
