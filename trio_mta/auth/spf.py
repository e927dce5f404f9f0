"""SPF (RFC 7208) with pyspf, its DNS answered by the trio resolver.

pyspf is the SPF implementation by the RFC's own test-suite authors: it passes the
RFC 7208 test suite, including the 10-lookup limit, the 2-void-lookup limit
(§4.6.4), macros, ``exp=`` and ``redirect=``. Writing another evaluator would
mean re-deriving all of that. pyspf is synchronous and does its own DNS, so a
check runs in a worker thread, and every lookup it makes calls back into trio
(``trio.from_thread.run``) to the server's :class:`~trio_mta.dns.Resolver`: the
same nameservers, timeouts and cache as the rest of trio_mta, and the event loop
never blocks.

pyspf looks DNS up through its module-level ``DNSLookup``. That name is replaced
once by a dispatcher that uses our lookup in threads running one of our checks
and pyspf's own everywhere else, so an application that embeds trio_mta and uses
pyspf itself keeps its behaviour.
"""

from __future__ import annotations

import threading
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


async def check_spf(resolver: Resolver, client_ip: str, sender: str, helo: str | None, *,
                    timeout: float, limiter: trio.CapacityLimiter | None = None) -> SpfResult:
    """Evaluate SPF for the MAIL FROM *sender* (the HELO name for ``<>``), RFC 7208 §2.3-2.4.

    Never raises and never takes longer than *timeout*: a DNS failure or a check
    that runs out of time is ``temperror``.
    """
    helo = helo or ""
    identity = "mailfrom" if sender else "helo"
    domain = sender.rpartition("@")[2] if sender else helo
    if not domain:
        return SpfResult("none", identity, domain, "no domain to check")
    abandoned = threading.Event()

    def lookup(name: str, qtype: str) -> Answers:
        if abandoned.is_set():
            raise pyspf.TempError("SPF check abandoned: time limit")
        try:
            rdatas = trio.from_thread.run(resolver.records, name, qtype)
        except DnsTemporaryError as exc:
            raise pyspf.TempError(str(exc)) from None
        return [((name, qtype), _value(qtype, rd)) for rd in rdatas]

    def run() -> tuple[str, str]:
        _local.lookup = lookup
        try:
            query = pyspf.query(i=client_ip, s=sender, h=helo, timeout=timeout)
            result, _code, explanation = query.check()
            return str(result), str(explanation)
        except Exception as exc:  # pyspf on hostile records: a result, never a crash
            return "temperror", f"{type(exc).__name__}: {exc}"
        finally:
            _local.lookup = None

    with trio.move_on_after(timeout) as scope:
        result, explanation = await trio.to_thread.run_sync(
            run, limiter=limiter, abandon_on_cancel=True)
    if scope.cancelled_caught:
        abandoned.set()
        return SpfResult("temperror", identity, domain, f"SPF check exceeded {timeout:g}s")
    if result not in RESULTS:
        result, explanation = "permerror", f"unexpected SPF result {result!r}"
    return SpfResult(result, identity, domain.lower(), explanation)


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
