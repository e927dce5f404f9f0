"""What the SMTP server holds for mail authentication: the signer and the verifier.

The session asks two questions of :class:`MailAuth`: "sign this?" for mail from
trusted or authenticated clients (SPEC §9: signed once, before it is queued, so
every copy carries the signature) and "check this?" for mail on ``smtp``
listeners from everyone else. Mail from the Internet is never signed.
"""

from __future__ import annotations

import trio

from trio_mta import log
from trio_mta.auth.inbound import THREAD_THRESHOLD, Check, Verifier
from trio_mta.auth.signing import Signer
from trio_mta.config import Config
from trio_mta.dns import Resolver
from trio_mta.metrics import Metrics

__all__ = ["MailAuth"]


class MailAuth:
    def __init__(self, config: Config, *, resolver: Resolver | None = None,
                 metrics: Metrics | None = None) -> None:
        self.signer = Signer(config.dkim.sign)
        self.verifier: Verifier | None = None
        if config.verify.any:
            resolver = resolver or Resolver(config.dns.nameservers, config.dns.timeout)
            self.verifier = Verifier(config.verify, resolver, hostname=config.hostname,
                                     dns_timeout=config.dns.timeout, metrics=metrics)

    def check(self, *, mode: str, trusted: bool, authenticated: bool, client_ip: str,
              sender: str, helo: str | None) -> Check | None:
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
