"""What the SMTP server holds for mail authentication: the signer and the verifier.

The session asks two questions of :class:`MailAuth`: "sign this?" for mail from
trusted or authenticated clients (SPEC §9: signed once, before it is queued, so
every copy carries the signature) and "check this?" for mail on ``smtp``
listeners from everyone else. Mail from the Internet is never signed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import trio

from trio_mta import log
from trio_mta.auth.inbound import THREAD_THRESHOLD, Check, Verifier
from trio_mta.auth.signing import Signer
from trio_mta.config import Config
from trio_mta.dns import Resolver
from trio_mta.metrics import Metrics
from trio_mta.queue.bodies import SpooledBody, crc_of
from trio_mta.smtp import Reply

__all__ = ["Done", "MailAuth"]

Body = bytes | SpooledBody


@dataclass(frozen=True)
class Done:
    """The end-of-DATA outcome: what to queue, and whether to refuse it instead."""

    body: Body
    trace: bytes  # our header fields, now with DKIM-Signature or Authentication-Results
    log_fields: dict[str, Any] = field(default_factory=dict)
    refusal: Reply | None = None


class MailAuth:
    def __init__(
        self, config: Config, *, resolver: Resolver | None = None, metrics: Metrics | None = None
    ) -> None:
        self.signer = Signer(config.dkim.sign)
        self.verifier: Verifier | None = None
        if config.verify.any:
            resolver = resolver or Resolver(config.dns.nameservers, config.dns.timeout)
            self.verifier = Verifier(
                config.verify,
                resolver,
                hostname=config.hostname,
                dns_timeout=config.dns.timeout,
                metrics=metrics,
            )

    def check(
        self,
        *,
        mode: str,
        trusted: bool,
        authenticated: bool,
        client_ip: str,
        sender: str,
        helo: str | None,
    ) -> Check | None:
        """A per-transaction check when [verify] applies to this client (SPEC §9), else None."""
        if self.verifier is None or mode != "smtp" or trusted or authenticated:
            return None
        return self.verifier.begin(client_ip=client_ip, sender=sender, helo=helo)

    async def sign(self, message: bytes, *, queue_id: str) -> bytes:
        """DKIM-Signature fields for *message* (b"" when no key covers its From: domain).

        A signing failure is logged and the message goes unsigned: refusing a user's
        mail because of our key would be worse than sending it without a signature.
        """
        if not self.signer:
            return b""
        try:
            if len(message) > THREAD_THRESHOLD:
                return await trio.to_thread.run_sync(self.signer.sign, message)
            return self.signer.sign(message)
        except Exception as exc:
            log.error("dkim.sign_failed", id=queue_id, error=f"{type(exc).__name__}: {exc}")
            return b""

    async def end_of_data(
        self, check: Check | None, *, sign: bool, body: Body, trace: bytes, queue_id: str
    ) -> Done:
        """Check *body* when *check* is given, else sign it when *sign* (our user's mail).

        A body spooled to a file (large messages) is read in a worker thread; if a
        forged Authentication-Results is removed from it, the spool file is rewritten
        in place before the queue takes it.
        """
        if check is None and not (sign and self.signer):
            return Done(body, trace)
        if isinstance(body, bytes):
            data = body
        else:
            data = await trio.to_thread.run_sync(body.path.read_bytes)
        if check is None:
            return Done(body, await self.sign(trace + data, queue_id=queue_id) + trace)
        outcome = await check.at_end_of_data(data)
        kept: Body = outcome.message
        if not isinstance(body, bytes):
            kept = body
            if len(outcome.message) != len(data):
                kept = await trio.to_thread.run_sync(_rewrite, body, outcome.message)
        return Done(kept, outcome.header + trace, outcome.log_fields(), outcome.refusal)


def _rewrite(body: SpooledBody, data: bytes) -> SpooledBody:
    """Worker thread: replace a spool file's content (not yet queued, so no crash risk
    beyond losing an unacknowledged message) and describe it afresh."""
    fd = os.open(body.path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return SpooledBody(body.path, len(data), crc_of(data))
