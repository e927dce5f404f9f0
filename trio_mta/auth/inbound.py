"""Verifying one inbound transaction: SPF at RCPT or end of DATA, DKIM and DMARC at end.

:class:`Verifier` holds what every session shares (settings, resolver, metrics);
:meth:`Verifier.begin` gives a :class:`Check` for one transaction, which the SMTP
session calls at two points: :meth:`Check.at_rcpt` (only refuses when
``spf_enforce`` is on) and :meth:`Check.at_end_of_data`, which strips forged
``Authentication-Results:``, runs the checks and returns our header.

Every DNS lookup goes through :class:`~trio_mta.dns.Resolver` with its timeout and
big messages are hashed in a worker thread, so the event loop never waits. No
outcome of a check loses a message: DNS trouble is ``temperror`` and the mail is
accepted unless a policy says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
from dns.rdtypes.ANY.TXT import TXT

from trio_mta.auth import dkim_verify
from trio_mta.auth.dkim_verify import DkimResult, KeyAnswer
from trio_mta.auth.dmarc import DmarcResult, check_dmarc
from trio_mta.auth.results import authentication_results, strip_ours
from trio_mta.auth.signing import from_domains
from trio_mta.auth.spf import Memo, SpfResult, check_spf
from trio_mta.config.loader import VerifyConfig
from trio_mta.dns import DnsTemporaryError, Resolver
from trio_mta.metrics import Metrics
from trio_mta.smtp import Reply

__all__ = ["Check", "Outcome", "Verifier"]

# Above this size body hashing runs in a worker thread (a 30 MB message would hold
# the event loop for a second); below it the thread hop costs more than the hash.
THREAD_THRESHOLD = 256 * 1024
SPF_TIME_FACTOR = 4  # one SPF check may take this many DNS timeouts (20 s by default)


@dataclass(frozen=True)
class Outcome:
    """What the end-of-DATA check decided."""

    header: bytes  # our Authentication-Results field, CRLF-terminated
    message: bytes  # the message with forged Authentication-Results removed
    refusal: Reply | None  # set when dmarc_enforce refuses the message
    spf: SpfResult | None = None
    dkim: tuple[DkimResult, ...] | None = None
    dmarc: DmarcResult | None = None

    def log_fields(self) -> dict[str, str]:
        """``spf=pass dkim=pass,fail dmarc=pass`` for the smtpd.accepted line."""
        fields: dict[str, str] = {}
        if self.spf is not None:
            fields["spf"] = self.spf.result
        if self.dkim is not None:
            fields["dkim"] = ",".join(r.result for r in self.dkim) or "none"
        if self.dmarc is not None:
            fields["dmarc"] = self.dmarc.result
        return fields


class Verifier:
    def __init__(
        self,
        settings: VerifyConfig,
        resolver: Resolver,
        *,
        hostname: str,
        dns_timeout: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.hostname = hostname
        self.spf_timeout = dns_timeout * SPF_TIME_FACTOR
        self.metrics = metrics
        self.spf_memo: Memo = {}

    def begin(self, *, client_ip: str, sender: str, helo: str | None) -> Check:
        return Check(self, client_ip, sender, helo)

    def count(self, method: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.mail_auth_result(method, result)


@dataclass
class Check:
    verifier: Verifier
    client_ip: str
    sender: str
    helo: str | None
    _spf: SpfResult | None = field(default=None, init=False)

    async def spf(self) -> SpfResult:
        """Evaluated once per transaction, however often asked."""
        if self._spf is None:
            v = self.verifier
            self._spf = await check_spf(
                v.resolver,
                self.client_ip,
                self.sender,
                self.helo,
                timeout=v.spf_timeout,
                memo=v.spf_memo,
            )
        return self._spf

    @property
    def enforces_spf(self) -> bool:
        """Whether :meth:`at_rcpt` can refuse anything (else the session need not ask)."""
        return self.verifier.settings.spf_enforce

    async def at_rcpt(self) -> Reply | None:
        """``spf_enforce``: SPF ``fail`` refuses the recipient (RFC 7372 X.7.23)."""
        if not self.verifier.settings.spf_enforce:
            return None
        result = await self.spf()
        if result.result != "fail":
            return None
        return Reply(
            550,
            "5.7.23",
            f"SPF fail: {result.domain} does not allow {self.client_ip} to send its mail",
        )

    async def at_end_of_data(self, message: bytes) -> Outcome:
        v = self.verifier
        settings = v.settings
        message = strip_ours(message, v.hostname)
        if len(message) > THREAD_THRESHOLD:  # splitting 30 MB into lines takes a while
            parsed = await trio.to_thread.run_sync(dkim_verify.parse, message)
        else:
            parsed = dkim_verify.parse(message)
        spf: SpfResult | None = None
        dkim_results: list[DkimResult] | None = None
        want_spf = settings.spf or settings.dmarc
        want_dkim = settings.dkim or settings.dmarc
        found = dkim_verify.signatures(parsed) if want_dkim else []
        names = dkim_verify.key_names(found)
        if all(v.resolver.peek(name, "TXT") is not None for name in names):
            # The keys are cached (or there are none): DKIM needs no wait, so SPF first
            # loses no time, and a nursery would be a fifth of the check's cost.
            if want_spf:
                spf = await self.spf()
            if want_dkim:
                dkim_results = await self._dkim(message, parsed, found, names)
        else:
            # Both may wait on DNS: let the waits overlap.
            async with trio.open_nursery() as nursery:
                if want_spf:

                    async def run_spf() -> None:
                        nonlocal spf
                        spf = await self.spf()

                    nursery.start_soon(run_spf)

                async def run_dkim() -> None:
                    nonlocal dkim_results
                    dkim_results = await self._dkim(message, parsed, found, names)

                nursery.start_soon(run_dkim)
        dmarc: DmarcResult | None = None
        if settings.dmarc:
            dmarc = await self._dmarc(parsed, spf, dkim_results or [])
        shown_spf = spf if settings.spf else None
        shown_dkim = dkim_results if settings.dkim else None
        if shown_spf is not None:
            v.count("spf", shown_spf.result)
        for item in shown_dkim or ():
            v.count("dkim", item.result)
        if shown_dkim == []:
            v.count("dkim", "none")
        if dmarc is not None:
            v.count("dmarc", dmarc.result)
        header = authentication_results(
            v.hostname,
            spf=shown_spf,
            dkim=shown_dkim,
            dmarc=dmarc,
            sender=self.sender,
            helo=self.helo or "",
        )
        refusal = None
        if (
            settings.dmarc_enforce
            and dmarc is not None
            and dmarc.result == "fail"
            and dmarc.disposition == "reject"
        ):
            refusal = Reply(
                550, "5.7.1", f"Email rejected per DMARC policy for {dmarc.from_domain}"
            )
        return Outcome(
            header,
            message,
            refusal,
            shown_spf,
            None if shown_dkim is None else tuple(shown_dkim),
            dmarc,
        )

    async def _dkim(
        self,
        message: bytes,
        parsed: dkim_verify.Parsed | None,
        found: list[dkim_verify.SignatureInfo | None],
        names: list[str],
    ) -> list[DkimResult]:
        if not found:
            return []
        keys: dict[str, KeyAnswer] = {}

        async def fetch(name: str) -> None:
            try:
                rdatas = await self.verifier.resolver.records(name, "TXT")
            except DnsTemporaryError as exc:
                keys[name] = KeyAnswer(temporary_error=str(exc))
                return
            keys[name] = KeyAnswer(
                tuple(b"".join(rd.strings) for rd in rdatas if isinstance(rd, TXT))
            )

        if len(names) == 1:
            await fetch(names[0])
        else:
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(fetch, name)
        assert parsed is not None  # signatures were found in it
        if len(message) > THREAD_THRESHOLD:
            return await trio.to_thread.run_sync(dkim_verify.verify, parsed, found, keys)
        return dkim_verify.verify(parsed, found, keys)

    async def _dmarc(
        self,
        parsed: dkim_verify.Parsed | None,
        spf: SpfResult | None,
        dkim_results: list[DkimResult],
    ) -> DmarcResult:
        domains = set(from_domains(parsed[0] if parsed is not None else []))
        if len(domains) != 1:
            # RFC 7489 §6.6.1: no usable From: domain, or several, cannot be evaluated.
            why = "no From: domain" if not domains else "several From: domains"
            return DmarcResult("permerror", "", reason=why)
        return await check_dmarc(self.verifier.resolver, domains.pop(), spf, dkim_results)
