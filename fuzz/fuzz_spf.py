#!/usr/bin/env python3
"""atheris harness for SPF (RFC 7208) at our boundary with pyspf (``trio_mta.auth.spf``).

The input is text. Its first line is ``CLIENT-IP|SENDER|HELO`` (an IP that does not
parse is replaced by an IPv4 address derived from its bytes; SENDER empty or ``<>``
is the null sender; HELO ``-`` is none). Every further line is one DNS record,
``NAME TYPE DATA``: TXT (DATA is the record, cut into 255-octet strings), A, AAAA,
MX (``PREFERENCE HOST``), PTR, or TEMP (every lookup of NAME fails temporarily).
Lines that make no valid record are ignored. ``check_spf`` runs on a fake
``Resolver`` that answers from those records in-process (no sockets), exactly as
the real one would after fetching them: ``[]`` for a name it has nothing for or
cannot parse, ``DnsTemporaryError`` for TEMP. Since no answer ever waits, the
coroutine is driven directly, with trio's nursery and deadline replaced by their
sequential equivalents (``trio.run`` per input cost more than the check: about 100
executions a second instead of 900).

Oracle ("only the documented results, never an exception", plus RFC 7208 limits):

- ``check_spf`` returns an ``SpfResult`` with one of the seven RFC 7208 results
  and identity ``mailfrom`` (``helo`` for the null sender), and never raises;
- ``temperror`` only when a lookup failed temporarily: a hostile record is the
  publisher's error (``permerror``, §2.6.7), not a reason to defer the mail;
- the domain pyspf evaluated is the domain ``check_spf`` reports (RFC 7208 §4.1,
  the sender's domain: the text after its last ``@``); one that is not a
  multi-label domain name (an address literal, a single label, an empty or
  over-long label) is ``none`` without any lookup (§4.3);
- §4.6.4: pyspf's count of DNS-querying terms is at most 10 and of void lookups
  at most 2 unless the result is ``permerror`` (and never more than 11 / 3:
  evaluation stops there); the distinct (name, type) queries made to the resolver
  stay within what those limits allow: TXT <= 22 (the record, 10 include/redirect
  targets, one ``exp=`` per evaluated record, which does not count), MX <= 10,
  PTR <= 1 (only the client's reverse name), A/AAAA <= 110 (10 terms, each MX or
  PTR term at most 10 address lookups, plus ``%{p}``'s 10);
- determinism, and the claim ``check_spf``'s docstring rests on (its
  fetch-and-restart evaluation gives what one pyspf pass with every answer at
  hand gives): a second ``check_spf`` on the same resolver, which now has every
  answer cached (``peek``), gives the same result in one pass, fetching nothing
  but the temporary failures again.

    python fuzz/fuzz_spf.py fuzz/corpus-spf fuzz/seeds/spf
"""

from __future__ import annotations

import contextlib
import ipaddress
import sys
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import atheris
import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA

with atheris.instrument_imports():
    import spf as pyspf

    from trio_mta.auth import spf
    from trio_mta.dns import DnsTemporaryError

RESULTS = {"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"}
TIMEOUT = 60.0
IN = dns.rdataclass.IN
LIMITS = {"TXT": 22, "MX": 10, "PTR": 1, "ADDRESS": 110}


class _Recording(spf._Query):  # type: ignore[misc]
    """Our pyspf query, remembered so its lookup counters can be read afterwards."""

    made: list[Any] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _Recording.made.append(self)
        super().__init__(*args, **kwargs)


spf._Query = _Recording  # type: ignore[misc]  # _one_pass looks _Query up at call time


def _key(name: str) -> str:
    return name.strip().lower().rstrip(".")


class Zone:
    def __init__(self, lines: list[bytes]) -> None:
        self.records: dict[tuple[str, str], list[Any]] = {}
        self.temporary: set[str] = set()
        for line in lines:
            self._add(line)

    def _add(self, line: bytes) -> None:
        parts = line.split(b" ", 2)
        if len(parts) < 2:
            return
        name = _key(parts[0].decode("utf-8", "replace"))
        kind = parts[1].decode("ascii", "replace").upper()
        data = parts[2] if len(parts) == 3 else b""
        if kind == "TEMP":
            self.temporary.add(name)
            return
        if kind == "TXT":
            strings = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
            txt = dns.rdtypes.ANY.TXT.TXT(IN, dns.rdatatype.TXT, strings)
            self.records.setdefault((name, kind), []).append(txt)
            return
        try:
            rd = self._rdata(kind, data)
        except (ValueError, dns.exception.DNSException, UnicodeError):
            return
        if rd is not None:
            self.records.setdefault((name, kind), []).append(rd)

    @staticmethod
    def _rdata(kind: str, data: bytes) -> Any:
        text = data.decode("ascii")  # raises UnicodeError on non-ASCII (not for TXT)
        if kind == "A":
            return dns.rdtypes.IN.A.A(IN, dns.rdatatype.A, text.strip())
        if kind == "AAAA":
            return dns.rdtypes.IN.AAAA.AAAA(IN, dns.rdatatype.AAAA, text.strip())
        if kind == "MX":
            pref, _, host = text.strip().partition(" ")
            exchange = dns.name.from_text(host.strip() or ".")
            return dns.rdtypes.ANY.MX.MX(IN, dns.rdatatype.MX, int(pref) & 0xFFFF, exchange)
        if kind == "PTR":
            target = dns.name.from_text(text.strip() or ".")
            return dns.rdtypes.ANY.PTR.PTR(IN, dns.rdatatype.PTR, target)
        return None

    def answer(self, name: str, qtype: str) -> list[Any]:
        """What ``Resolver.records`` returns, fetched from this zone."""
        key = _key(name)
        if key in self.temporary:
            raise DnsTemporaryError(f"{key}: SERVFAIL (fake)", "4.4.3")
        try:
            dns.name.from_text(name.strip())
        except dns.exception.DNSException:
            return []
        return self.records.get((key, qtype), [])


class FakeResolver:
    """What check_spf uses of ``Resolver`` (peek, records, expiry), over a Zone, no sockets.

    Like the real one it keeps what it fetched (not temporary failures): a second check
    finds every answer by ``peek`` and needs no fetch at all.
    """

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.cache: dict[tuple[str, str], list[Any]] = {}
        self.queries: list[tuple[str, str]] = []

    def peek(self, name: str, qtype: str) -> list[Any] | None:
        return self.cache.get((_key(name), qtype))

    def expiry(self, name: str, qtype: str) -> None:
        return None

    async def records(self, name: str, qtype: str) -> list[Any]:
        key = (_key(name), qtype)
        self.queries.append(key)
        found = self.zone.answer(name, qtype)
        self.cache[key] = found
        return found


class _Nursery:
    """``trio.open_nursery`` for tasks that never wait: each runs to its end in turn."""

    async def __aenter__(self) -> _Nursery:
        self.tasks: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = []
        return self

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self.tasks.append((fn, args))

    async def __aexit__(self, *exc: object) -> None:
        for fn, args in self.tasks:
            await fn(*args)


class _Trio:
    """What check_spf uses of trio, for a resolver whose answers are already there.

    ``trio.run`` per input (an epoll, a wakeup socket pair, signal handling) costs more
    than the check itself; with answers that never make a task wait, trio's schedule
    reduces to running each fetch in turn, and the deadline can never pass.
    """

    @staticmethod
    def move_on_after(seconds: float) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    @staticmethod
    def open_nursery() -> _Nursery:
        return _Nursery()


spf.trio = _Trio  # type: ignore[assignment]


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("check_spf waited for something with every answer at hand")


def _domain_name(domain: str) -> bool:
    """RFC 7208 §4.3: a multi-label domain name; an address literal is not one."""
    labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
    return not domain.startswith("[") and len(labels) > 1 and all(0 < len(x) < 64 for x in labels)


def _client(token: str) -> str:
    try:
        return str(ipaddress.ip_address(token))
    except ValueError:
        return str(ipaddress.IPv4Address(zlib.crc32(token.encode("utf-8", "replace"))))


MX_HOSTS = 10  # RFC 7208 §4.6.4: the most MX hosts one mx term looks up


def _check_limits(where: str, result: str, queries: list[tuple[str, str]]) -> None:
    counts: dict[str, int] = {}
    for _name, qtype in set(queries):
        kind = "ADDRESS" if qtype in ("A", "AAAA") else qtype
        counts[kind] = counts.get(kind, 0) + 1
    for kind, n in counts.items():
        if n > LIMITS.get(kind, 0):
            raise AssertionError(f"{where}: {n} distinct {kind} queries ({result})")
    for q in _Recording.made:
        if q.lookups > _limit(result, pyspf.MAX_LOOKUP):
            raise AssertionError(f"{where}: {q.lookups} DNS-querying terms, result {result}")
        # One term can make several void lookups before pyspf checks the count (an
        # mx whose hosts have no address: one each, at most 10 per RFC 7208 §4.6.4),
        # so an evaluation that ended in permerror may pass the limit by that much;
        # the distinct-query counts above still bound the DNS work.
        void_limit = _limit(result, pyspf.MAX_VOID_LOOKUPS)
        if result == "permerror":
            void_limit = max(void_limit, pyspf.MAX_VOID_LOOKUPS + MX_HOSTS)
        if q.void_lookups > void_limit:
            raise AssertionError(f"{where}: {q.void_lookups} void lookups, result {result}")


def _limit(result: str, limit: int) -> int:
    """The most a finished evaluation may count: the limit, one more when that is what
    made it a permerror (pyspf counts the term, then stops)."""
    return limit + 1 if result in ("permerror", "temperror") else limit


def test_one_input(data: bytes) -> None:
    first, _, rest = data.partition(b"\n")
    fields = first.rstrip(b"\r").decode("utf-8", "replace").split("|", 2)
    fields += [""] * (3 - len(fields))
    client_ip = _client(fields[0].strip())
    sender = "" if fields[1] in ("", "<>") else fields[1]
    helo = None if fields[2] == "-" else fields[2]
    zone = Zone([line.rstrip(b"\r") for line in rest.split(b"\n")])
    where = f"{client_ip!r} {sender!r} {helo!r}"

    resolver = FakeResolver(zone)

    async def cold_then_warm() -> list[tuple[spf.SpfResult, list[tuple[str, str]], list[Any]]]:
        out = []
        for _ in range(2):
            _Recording.made = []
            resolver.queries = []
            got = await spf.check_spf(resolver, client_ip, sender, helo, timeout=TIMEOUT)  # type: ignore[arg-type]
            out.append((got, resolver.queries, _Recording.made))
            _check_limits(where, got.result, resolver.queries)
        return out

    (cold, queries, made), (warm, again, warm_made) = _run(cold_then_warm())
    result = cold.result
    if result not in RESULTS:
        raise AssertionError(f"{where}: result {cold!r}")
    if cold.identity != ("mailfrom" if sender else "helo"):
        raise AssertionError(f"{where}: identity {cold!r}")
    if result == "temperror" and not any(name in zone.temporary for name, _ in queries):
        raise AssertionError(f"{where}: temperror without a failed lookup: {cold!r}")
    checked = sender.rpartition("@")[2] if sender else helo or ""
    if not _domain_name(checked) and (result != "none" or queries):
        raise AssertionError(f"{where}: {checked!r} is no domain name, yet {cold} ({queries})")
    if made:
        evaluated = made[-1].o.lower()
        if evaluated != cold.domain:
            raise AssertionError(f"{where}: pyspf evaluated {evaluated!r}, reported {cold}")
    if warm.result != result:
        raise AssertionError(f"{where}: {cold!r} with the answers fetched, {warm!r} from cache")
    if any(name not in zone.temporary for name, _ in again):
        raise AssertionError(f"{where}: the second check fetched {again} again")
    if made and len(warm_made) > 1 + len(again):
        raise AssertionError(f"{where}: {len(warm_made)} passes with every answer at hand")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
