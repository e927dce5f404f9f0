"""DMARC (RFC 7489): the From: domain's policy, and whether SPF or DKIM is aligned with it.

DMARC evaluation is small and fully specified (record discovery §6.6.3, tags §6.3,
alignment §3.1, ``pct`` §6.6.4), so it is written here against the RFC rather
than taken from a library: the Python DMARC packages do their own blocking DNS,
and the one hard part, the organizational domain, comes from ``publicsuffixlist``,
which ships the Public Suffix List inside the package (no network at run time).
Record parsing (:func:`parse_record`) and the verdict (:func:`evaluate`) are pure;
:func:`fetch_policy` is the only function that does DNS, through the trio resolver.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

from dns.rdtypes.ANY.TXT import TXT
from publicsuffixlist import PublicSuffixList

from trio_mta.auth.dkim_verify import DkimResult
from trio_mta.auth.spf import SpfResult
from trio_mta.dns import DnsTemporaryError, Resolver

__all__ = ["DmarcPolicy", "DmarcResult", "evaluate", "fetch_policy", "org_domain", "parse_record"]

_POLICIES = ("none", "quarantine", "reject")
_VERSION = re.compile(r"v\s*=\s*DMARC1\Z")  # §6.3: "MUST match precisely"
_PCT = re.compile(r"[0-9]{1,3}\Z")
# §6.4 dmarc-uri: an RFC 3986 URI (its "!" and "," percent-encoded), then an optional size.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[\x22-\x2b\x2d-\x7e]+(?:![0-9]+[kmgtKMGT]?)?\Z")


@cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


@lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (the domain itself if it is a suffix)."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


@dataclass(frozen=True)
class DmarcPolicy:
    """A parsed ``v=DMARC1`` record; *domain* is where it was found."""

    domain: str
    p: str
    sp: str
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"


@dataclass(frozen=True)
class DmarcResult:
    result: str  # pass | fail | none | temperror | permerror (RFC 8601 §2.7.7 / RFC 7489 §11.2)
    from_domain: str
    policy: str = "none"  # the policy that applies to this From: domain (p or sp)
    disposition: str = "none"  # what the policy asks for this message, after pct
    reason: str = ""


def parse_record(text: str, domain: str) -> DmarcPolicy | None:
    """RFC 7489 §6.3-6.4; None if *text* is not a DMARC record (``v=DMARC1`` first).

    A record with a missing or unknown ``p=``, or an unknown ``sp=``, is ignored unless
    its ``rua`` holds a syntactically valid URI (§6.6.3 step 6: then it counts as
    ``p=none``, for subdomains too); unknown tags are ignored (§6.3), and a ``pct``
    that is not 0..100 in digits is the default 100 (§6.3: errors fall back to defaults).
    """
    parts = [part.strip() for part in text.split(";")]
    if not _VERSION.match(parts[0]):
        return None
    tags: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    if p not in _POLICIES or sp not in _POLICIES:
        if not any(_URI.match(uri.strip()) for uri in tags.get("rua", "").split(",")):
            return None
        p = sp = "none"
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if _PCT.match(pct_text) and int(pct_text) <= 100 else 100
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return DmarcPolicy(domain, p, sp, pct, adkim, aspf)


async def _lookup(resolver: Resolver, domain: str) -> DmarcPolicy | None:
    records = [
        b"".join(rd.strings).decode("utf-8", "replace")
        for rd in await resolver.records(f"_dmarc.{domain}", "TXT")
        if isinstance(rd, TXT)
    ]
    policies = [p for p in (parse_record(r, domain) for r in records) if p is not None]
    # §6.6.3 step 5: more than one record is as none.
    return policies[0] if len(policies) == 1 else None


async def fetch_policy(resolver: Resolver, from_domain: str) -> DmarcPolicy | None:
    """§6.6.3: the From: domain's record, else its organizational domain's.

    Raises :class:`DnsTemporaryError` when DNS cannot say.
    """
    policy = await _lookup(resolver, from_domain)
    if policy is None:
        org = org_domain(from_domain)
        if org != from_domain:
            policy = await _lookup(resolver, org)
    return policy


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """§3.1: strict is the same name; relaxed is the same organizational domain."""
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return identifier == from_domain
    return org_domain(identifier) == org_domain(from_domain)


def evaluate(
    from_domain: str,
    policy: DmarcPolicy | None,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    *,
    sample: float | None = None,
) -> DmarcResult:
    """The verdict for one message; *sample* in [0, 1) picks the pct bucket (random if None)."""
    if policy is None:
        return DmarcResult("none", from_domain, reason="no DMARC record")
    spf_ok = (
        spf is not None
        and spf.result == "pass"
        and spf.identity == "mailfrom"
        and aligned(spf.domain, from_domain, policy.aspf)
    )
    dkim_ok = any(r.result == "pass" and aligned(r.domain, from_domain, policy.adkim) for r in dkim)
    applies = policy.p if policy.domain == from_domain else policy.sp
    if spf_ok or dkim_ok:
        why = "spf aligned" if spf_ok else "dkim aligned"
        return DmarcResult("pass", from_domain, applies, "none", why)
    # §6.6.4: pct is the share of failing mail the policy applies to; the rest gets the
    # next policy down (reject -> quarantine, quarantine -> none).
    draw = random.random() if sample is None else sample
    disposition = applies
    if draw * 100 >= policy.pct:
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(applies, "none")
    return DmarcResult("fail", from_domain, applies, disposition, "no aligned spf or dkim pass")


async def check_dmarc(
    resolver: Resolver, from_domain: str, spf: SpfResult | None, dkim: Sequence[DkimResult]
) -> DmarcResult:
    """Look the policy up and evaluate; DNS failure is ``temperror`` (§6.6.3 step 1)."""
    try:
        policy = await fetch_policy(resolver, from_domain)
    except DnsTemporaryError as exc:
        return DmarcResult("temperror", from_domain, reason=str(exc))
    return evaluate(from_domain, policy, spf, dkim)
