"""SPF (RFC 7208) with pyspf, its DNS answered by the trio resolver.

pyspf is the SPF implementation by the RFC's own test-suite authors: it passes the
RFC 7208 test suite, including the 10-lookup limit, the 2-void-lookup limit
(§4.6.4), macros, ``exp=`` and ``redirect=``. Writing another evaluator would
mean re-deriving all of that.

pyspf is synchronous and does its own DNS. Rather than run it in a worker thread
(each lookup a round trip between threads through the GIL: a measured 5 ms or more
per message under load), it runs on the event loop against answers fetched
beforehand: when it asks for a record not fetched yet, the evaluation is abandoned,
the record is fetched with the trio :class:`~trio_mta.dns.Resolver` (same
nameservers, timeouts and cache as the rest of trio_mta), and the evaluation starts
again. Each pass is pure CPU (tens of microseconds); the final pass sees every
answer, so pyspf's own lookup counting applies to it unchanged.

pyspf looks DNS up through its module-level ``DNSLookup``. That name is replaced
once by a dispatcher that answers from our table while one of our evaluations
runs in this thread, and uses pyspf's own lookup everywhere else, so an
application that embeds trio_mta and uses pyspf itself keeps its behaviour.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import spf as pyspf
import trio

from trio_mta.dns import DnsTemporaryError, Resolver

__all__ = ["SpfResult", "check_spf"]

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

Answers = list[tuple[tuple[str, str], Any]]
_local = threading.local()
_original_lookup: Callable[..., Answers] = pyspf.DNSLookup


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: Any = 30) -> Answers:
    lookup: Callable[[str, str], Answers] | None = getattr(_local, "lookup", None)
    if lookup is None:
        return _original_lookup(name, qtype, strict, timeout)
    return lookup(name, qtype)


pyspf.DNSLookup = _dispatch


@dataclass(frozen=True)
class SpfResult:
    result: str  # one of RESULTS
    identity: str  # "mailfrom" or "helo"
    domain: str  # the domain checked
    reason: str = ""


class _Query(pyspf.query):  # type: ignore[misc]
    """pyspf's query, with the explanation kept out of the lookup limits.

    pyspf expands ``exp=`` as it parses the record, before any mechanism, and counts
    what that expansion finds nothing for (``%{p}``'s PTR names without addresses)
    against the void-lookup limit: a hostile or careless explanation could use it up
    and turn the record's own pass or fail into a permerror. RFC 7208 §4.6.4 limits
    the lookups of terms, and §6.2 says a failing explanation is as if there were
    none, so its counts are put back.
    """

    lookups: int
    void_lookups: int

    def get_explanation(self, spec: str) -> str | None:
        lookups, voids = self.lookups, self.void_lookups
        try:
            return super().get_explanation(spec)  # type: ignore[no-any-return]
        finally:
            self.lookups, self.void_lookups = lookups, voids


class _NotFetched(BaseException):
    """Raised through pyspf (a BaseException: pyspf catches Exception) to stop a pass."""


MAX_PASSES = 200  # far above what the lookup limits allow; a guard, not a policy


MEMO_ENTRIES = 10_000
Memo = dict[tuple[str, str, str], tuple[float, "SpfResult"]]


async def check_spf(
    resolver: Resolver,
    client_ip: str,
    sender: str,
    helo: str | None,
    *,
    timeout: float,
    memo: Memo | None = None,
) -> SpfResult:
    """Evaluate SPF for the MAIL FROM *sender* (the HELO name for ``<>``), RFC 7208 §2.3-2.4.

    Never raises and never takes longer than *timeout*: a DNS failure or a check
    that runs out of time is ``temperror``.

    *memo* keeps results: the result is a function of the client address, sender,
    HELO name and the DNS answers, so it is reused until the first of the answers it
    used expires, exactly as if it were evaluated again from the cached answers.
    Only evaluations whose every lookup found records are kept.
    """
    helo = helo or ""
    # A link-local IPv6 peer comes as "fe80::1%eth0": the zone index (RFC 4007 §11) says
    # which interface, it is not part of the address, and pyspf's parsing chokes on it.
    client_ip = client_ip.partition("%")[0]
    identity = "mailfrom" if sender else "helo"
    domain = sender.rpartition("@")[2] if sender else helo
    if not domain:
        return SpfResult("none", identity, domain, "no domain to check")
    labels = domain.removesuffix(".").split(".")
    if domain.startswith("[") or len(labels) < 2 or not all(0 < len(x) < 64 for x in labels):
        # RFC 7208 §4.3: "none" at once, no lookup (pyspf would ask DNS for a HELO of
        # "[192.0.2.1]" or "localhost" as if they were names).
        return SpfResult("none", identity, domain.lower(), "not a multi-label domain name")
    memo_key = (client_ip, sender.lower(), helo.lower())
    if memo is not None:
        kept = memo.get(memo_key)
        if kept is not None and kept[0] > time.time():
            return kept[1]
    answers: dict[tuple[str, str], Answers | str] = {}  # str: a temporary error
    wanted: list[tuple[str, str]] = []

    def lookup(name: str, qtype: str) -> Answers:
        key = (name.lower().rstrip("."), qtype)
        found = answers.get(key)
        if found is None:
            cached = resolver.peek(name, qtype)  # answers of earlier checks, within TTL
            if cached is None:
                wanted.append(key)
                raise _NotFetched
            found = answers[key] = [((name, qtype), _value(qtype, rd)) for rd in cached]
        if isinstance(found, str):
            raise pyspf.TempError(found)
        return found

    async def fetch(key: tuple[str, str]) -> None:
        name, qtype = key
        try:
            rdatas = await resolver.records(name, qtype)
        except DnsTemporaryError as exc:
            answers[key] = str(exc)
            return
        answers[key] = [((name, qtype), _value(qtype, rd)) for rd in rdatas]

    with trio.move_on_after(timeout):
        for _ in range(MAX_PASSES):
            wanted.clear()
            result, explanation = _one_pass(lookup, client_ip, sender, helo, timeout)
            if not wanted:
                if result not in RESULTS:
                    result, explanation = "permerror", f"unexpected SPF result {result!r}"
                verdict = SpfResult(result, identity, domain.lower(), explanation)
                if memo is not None:
                    _remember(memo, memo_key, verdict, resolver, answers)
                return verdict
            async with trio.open_nursery() as nursery:
                for key in dict.fromkeys(wanted):
                    nursery.start_soon(fetch, key)
        return SpfResult("temperror", identity, domain, "SPF evaluation did not settle")
    return SpfResult("temperror", identity, domain, f"SPF check exceeded {timeout:g}s")


def _remember(
    memo: Memo,
    key: tuple[str, str, str],
    verdict: SpfResult,
    resolver: Resolver,
    answers: dict[tuple[str, str], Answers | str],
) -> None:
    expiries = [resolver.expiry(name, qtype) for name, qtype in answers]
    if not expiries or None in expiries:
        return  # an empty, missing or failed lookup: not known how long it holds
    if len(memo) >= MEMO_ENTRIES:
        memo.clear()
    memo[key] = (min(e for e in expiries if e is not None), verdict)


def _one_pass(
    lookup: Callable[[str, str], Answers], client_ip: str, sender: str, helo: str, timeout: float
) -> tuple[str, str]:
    """One synchronous pyspf evaluation against the answers fetched so far."""
    _local.lookup = lookup
    try:
        query = _Query(i=client_ip, s=sender, h=helo, timeout=timeout)
        if sender:
            # pyspf splits the sender at its first "@", but a quoted local part may
            # hold one too (RFC 5321 §4.1.2: ``"a@b"@example.org``); the domain is what
            # follows the last (RFC 7208 §4.1), the one check_spf reports. Split at the
            # first, a forger's ``"x@y"@victim.example`` checked ``y"@victim.example``:
            # none instead of the victim's fail.
            local, _, domain = sender.rpartition("@")
            query.l, query.o, query.d = local or "postmaster", domain, domain
        result, _code, explanation = query.check()
        return str(result), str(explanation)
    except _NotFetched:
        return "", ""
    except Exception as exc:  # pyspf on hostile records: a result, never a crash
        return "temperror", f"{type(exc).__name__}: {exc}"
    finally:
        _local.lookup = None


def _value(qtype: str, rd: Any) -> Any:
    """An rdata in the shape pyspf's own dnspython driver returns."""
    if qtype in ("A", "AAAA"):
        return rd.address
    if qtype == "MX":
        return (rd.preference, rd.exchange.to_text(omit_final_dot=True))
    if qtype == "PTR":
        return rd.target.to_text(omit_final_dot=True)
    if qtype in ("TXT", "SPF"):
        return rd.strings
    if qtype == "CNAME":
        return rd.target.to_text(omit_final_dot=True)
    return rd.to_text()
