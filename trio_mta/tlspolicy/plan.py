"""What TLS policy applies to a destination and to each of its MX hosts (SPEC §10).

Precedence, per host (RFC 8461 §2: DANE wins over MTA-STS):

1. ``dane``: the MX and address answers and the TLSA RRset are authenticated
   and hold usable records: STARTTLS is mandatory and the certificate must
   match one of them, else the host is skipped. Authenticated but only
   unusable records still make STARTTLS mandatory, unauthenticated
   (RFC 7672 §2.2), unless MTA-STS offers more. A failed TLSA lookup for an
   authenticated host skips the host (RFC 7672 §2.2: "indeterminate").
2. ``mta-sts``, mode ``enforce``: the host must match an ``mx:`` pattern, or it
   is skipped without a connection; STARTTLS is required and the certificate
   must verify for the MX name. In mode ``testing`` each of these failures is
   logged (``mta_sts.testing``) and delivery goes on under the base policy.
3. otherwise ``[relay] tls``: ``verify``, ``required``, ``opportunistic`` or ``none``.

A :class:`HostPlan` is data: remote delivery turns it into a connection and
``trio-mta tls-policy`` prints it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509

from trio_mta import log
from trio_mta.client import TLSCheck, TLSMode
from trio_mta.config import RelayConfig
from trio_mta.dns import DnsError, MailHost, Resolver, TlsaAnswer
from trio_mta.tls import client_context
from trio_mta.tlspolicy.cache import PolicyCache, StsSource, StsState
from trio_mta.tlspolicy.dane import match_chain, verify_with_anchors
from trio_mta.tlspolicy.sts import mx_matches

__all__ = ["HostPlan", "PolicyName", "TlsPlanner"]

PolicyName = Literal["dane", "mta-sts", "verify", "required", "opportunistic", "none"]
POLICY_NAMES: Final[tuple[PolicyName, ...]] = (
    "dane",
    "mta-sts",
    "verify",
    "required",
    "opportunistic",
    "none",
)
STATUS: Final = "4.7.5"  # X.7.5 cryptographic failure: every policy refusal defers with it


@dataclass(frozen=True)
class HostPlan:
    """How to talk to one MX host, or (``refusal`` set) why not to try it at all."""

    host: MailHost
    policy: PolicyName
    mode: TLSMode
    context: ssl.SSLContext | None
    check: TLSCheck | None = None
    refusal: str | None = None
    tlsa: TlsaAnswer | None = None
    label: str = ""  # what prefixes a failure's text: "dane", "mta-sts enforce"
    sts_testing: bool = False  # an MTA-STS testing policy is watching this host

    def explain(self, text: str) -> str:
        """A failure's text, naming the policy that caused it (for ``queue show``)."""
        return f"{self.label}: {text}" if self.label else text


class TlsPlanner:
    """Resolves the policies of destinations for :class:`~trio_mta.delivery.remote.RemoteAgent`
    and ``trio-mta tls-policy``; holds the contexts and the MTA-STS cache."""

    def __init__(
        self,
        relay: RelayConfig,
        resolver: Resolver,
        *,
        state_dir: Path | None,
        fetch_timeout: float = 30.0,
    ) -> None:
        self._relay = relay
        self._resolver = resolver
        self._base_context = (
            None if relay.tls == "none" else client_context(relay.tls, ca_file=relay.ca_file)
        )
        self._verify_context: ssl.SSLContext | None = None
        self._unverified_context = client_context("required", ca_file=None)
        self._anchors: list[x509.Certificate] | None = None
        cache = PolicyCache(state_dir / "mta-sts" if state_dir is not None else None)
        self.sts = StsSource(
            resolver,
            cache,
            self.verify_context,
            port=relay.mta_sts_port,
            fetch_timeout=fetch_timeout,
        )

    def verify_context(self) -> ssl.SSLContext:
        """``[relay] ca_file`` or the system store, host names checked; built on first use."""
        if self._verify_context is None:
            self._verify_context = client_context("verify", ca_file=self._relay.ca_file)
        return self._verify_context

    async def destination(self, domain: str, *, store: bool = True) -> StsState | None:
        """The MTA-STS state of *domain*, None when ``[relay] mta_sts`` is off."""
        if not self._relay.mta_sts:
            return None
        return await self.sts.lookup(domain, store=store)

    def base(self, host: MailHost) -> HostPlan:
        relay = self._relay
        return HostPlan(host, relay.tls, relay.tls, self._base_context)

    async def host(self, domain: str, host: MailHost, sts: StsState | None) -> HostPlan:
        """The plan for *host*, an MX of *domain*, given the domain's MTA-STS state."""
        tlsa: TlsaAnswer | None = None
        if self._relay.dane and host.authenticated:
            try:
                tlsa = await self._resolver.tlsa(host.name, self._relay.port)
            except DnsError as exc:
                refusal = f"TLSA lookup for authenticated MX {host.name} failed: {exc}"
                return HostPlan(host, "dane", "required", None, refusal=refusal, label="dane")
            if tlsa.authenticated and any(r.usable for r in tlsa.records):
                return self._dane(domain, host, tlsa)
        policy = sts.policy if sts is not None else None
        if policy is not None and policy.mode == "enforce":
            label = "mta-sts enforce"
            if not policy.allows(host.name):
                refusal = (
                    f"MX {host.name} does not match the policy of {domain} "
                    f"(mx: {', '.join(policy.mx)})"
                )
                return HostPlan(
                    host, "mta-sts", "verify", None, refusal=refusal, label=label, tlsa=tlsa
                )
            return HostPlan(
                host, "mta-sts", "verify", self.verify_context(), label=label, tlsa=tlsa
            )
        if tlsa is not None and tlsa.authenticated and tlsa.records:
            # RFC 7672 §2.2: secure but unusable TLSA records: encrypt, do not authenticate.
            return HostPlan(
                host,
                "dane",
                "required",
                self._unverified_context,
                tlsa=tlsa,
                label="dane (no usable TLSA records)",
            )
        plan = self.base(host)
        if policy is not None and policy.mode == "testing":
            return self._testing(domain, host, plan, policy.mx)
        return HostPlan(plan.host, plan.policy, plan.mode, plan.context, tlsa=tlsa)

    def _dane(self, domain: str, host: MailHost, tlsa: TlsaAnswer) -> HostPlan:
        names = [host.name] if host.name == domain else [host.name, domain]

        def check(chain: tuple[bytes, ...]) -> str | None:
            problem = match_chain(tlsa.records, chain, names=names)
            return None if problem is None else f"{problem} at {tlsa.name}"

        return HostPlan(
            host, "dane", "required", self._unverified_context, check=check, tlsa=tlsa, label="dane"
        )

    def _testing(
        self, domain: str, host: MailHost, plan: HostPlan, patterns: tuple[str, ...]
    ) -> HostPlan:
        """The base plan, with what enforce would have refused logged instead (RFC 8461 §5)."""
        if not any(mx_matches(p, host.name) for p in patterns):
            testing_failure(
                domain,
                host.name,
                f"MX {host.name} does not match the policy (mx: {', '.join(patterns)})",
            )
        check: TLSCheck | None = None
        if plan.mode != "none":
            anchors = self._trust_anchors()

            def check(chain: tuple[bytes, ...]) -> None:
                problem = _verify_chain(chain, anchors, host.name)
                if problem is not None:
                    testing_failure(domain, host.name, f"certificate: {problem}")
                return None

        return HostPlan(
            plan.host, plan.policy, plan.mode, plan.context, check=check, sts_testing=True
        )

    def _trust_anchors(self) -> list[x509.Certificate]:
        """The certificates the verify context trusts, for checking a chain after the fact."""
        if self._anchors is None:
            self._anchors = _load_anchors(self._relay.ca_file)
        return self._anchors


def testing_failure(domain: str, host: str, reason: str) -> None:
    """What an MTA-STS enforce policy would have refused, logged for mode testing."""
    log.warning("mta_sts.testing", domain=domain, host=host, would_defer=reason)


def _verify_chain(
    chain: tuple[bytes, ...], anchors: list[x509.Certificate], name: str
) -> str | None:
    if not anchors:
        return "no CA bundle file to check it against ([relay] ca_file)"
    if not chain:
        return "the server sent no certificate"
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        return "the server's certificate cannot be parsed"
    return verify_with_anchors(certs[0], certs[1:], anchors, names=[name])


def _load_anchors(ca_file: Path | None) -> list[x509.Certificate]:
    """``ca_file``, else the system bundle file OpenSSL uses; [] when there is none."""
    paths = ssl.get_default_verify_paths()
    candidates: list[str | Path | None] = (
        [ca_file] if ca_file is not None else [paths.cafile, paths.openssl_cafile]
    )
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            return x509.load_pem_x509_certificates(Path(candidate).read_bytes())
        except (OSError, ValueError):
            continue
    return []
