"""Where to send mail for a domain: MX lookup with the RFC 5321 §5.1 rules, on trio.

dnspython's async stub resolver runs on trio through its trio backend, so a lookup is
an ordinary trio task: cancellable, and AAAA/A queries run side by side in a nursery.
Tests point the resolver at a loopback name server; production uses /etc/resolv.conf.
Errors come out already classified (permanent or temporary, with the RFC 3463 status
the queue records), so delivery code never needs to know dnspython's exceptions.

For DANE (RFC 7672) answers also say whether they were authenticated: queries set
the AD bit (RFC 6840 §5.7) and the answer's AD bit is believed only from servers
on a trusted path, i.e. ``[dns] nameservers`` named in the configuration, or a
system resolver that is all loopback (a local validating resolver such as unbound).
An AD bit that crossed a network from a resolver we did not choose proves nothing
(RFC 4035 §4.9.3).
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.inet
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.resolver
import trio
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TLSA import TLSA
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from trio_mta.tlspolicy.dane import TlsaRecord

__all__ = [
    "DnsError",
    "DnsPermanentError",
    "DnsTemporaryError",
    "MailHost",
    "Resolver",
    "TlsaAnswer",
]

# RFC 3463 codes used here.
_NO_SUCH_DOMAIN = "5.1.2"  # X.1.2 bad destination system address
_NULL_MX = "5.1.10"  # RFC 7505 §4.2
_NO_ROUTE = "5.4.4"  # X.4.4 unable to route
_DNS_TEMPFAIL = "4.4.3"  # X.4.3 directory server failure

# One query attempt never waits longer than this, so a lost UDP datagram is retried
# within the overall timeout instead of eating all of it (dnspython's own default).
_ATTEMPT_TIMEOUT = 2.0
_CACHE_ENTRIES = 10_000  # distinct (name, type) answers kept


class DnsError(Exception):
    """A lookup that produced no usable answer; str() is the human-readable reason."""

    permanent: bool = False

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class DnsPermanentError(DnsError):
    """The answer is final (NXDOMAIN, null MX, nothing to connect to): bounce."""

    permanent = True


class DnsTemporaryError(DnsError):
    """No trustworthy answer (SERVFAIL, timeout, unreachable servers): retry later."""

    permanent = False


@dataclass(frozen=True)
class MailHost:
    """One host to try, in order; name is lower-case ASCII (A-labels), no final dot."""

    name: str
    preference: int
    addresses: tuple[str, ...]
    # The MX answer and this host's address answers all carried a trusted AD bit:
    # the precondition for looking up its TLSA records (RFC 7672 §2.2.1, §2.2.2).
    authenticated: bool = False


@dataclass(frozen=True)
class TlsaAnswer:
    """The TLSA RRset at ``_PORT._tcp.HOST``; ``authenticated`` as for :class:`MailHost`."""

    name: str
    records: tuple[TlsaRecord, ...]
    authenticated: bool


@dataclass
class _HostLookup:
    """AAAA and A results for one name, each half independent of the other."""

    v6: list[str] = field(default_factory=list)
    v4: list[str] = field(default_factory=list)
    aliased: bool = False
    error: DnsTemporaryError | None = None
    insecure: bool = False  # an answer with addresses lacked a trusted AD bit


class Resolver:
    """Finds the mail hosts of a domain and the addresses of a host."""

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        timeout: float = 5.0,
        *,
        prefer_ipv4: bool = False,
    ) -> None:
        """Empty *nameservers* means the system configuration; otherwise only those.

        *timeout* bounds each lookup (all retries and servers together).
        """
        if not timeout > 0:
            raise ValueError(f"DNS timeout must be positive, not {timeout!r}")
        servers: list[dns.nameserver.Nameserver] = []
        for host, port in nameservers:
            if not dns.inet.is_address(host):
                raise ValueError(f"DNS name server must be an IP address, not {host!r}")
            if not 0 < port < 65536:
                raise ValueError(f"DNS name server port out of range: {port}")
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        self._servers = servers
        self._timeout = timeout
        self._prefer_ipv4 = prefer_ipv4
        self._backend = dns.asyncbackend.get_backend("trio")
        self._resolver: dns.asyncresolver.Resolver | None = None
        # records(): positive answers by (name, type) until their TTL runs out. dnspython
        # caches too, but a lookup through it costs ~50 us of name parsing and resolution
        # set-up, paid several times per inbound message for SPF, DKIM and DMARC.
        self._records: dict[tuple[str, str], tuple[float, list[dns.rdata.Rdata]]] = {}
        self._trust_ad = bool(servers)

    @property
    def trusts_ad(self) -> bool:
        """Whether an AD bit from these servers is believed (see the module docstring)."""
        if not self._servers:
            with contextlib.suppress(DnsError):
                self._stub()
        return self._trust_ad

    def _stub(self) -> dns.asyncresolver.Resolver:
        """The dnspython resolver, built on first use.

        Reading /etc/resolv.conf lazily (and again after a failure) lets the MTA start
        and deliver locally on a machine whose resolver is not configured yet; remote
        mail then waits in the queue with a temporary error instead of crashing startup.
        """
        if self._resolver is not None:
            return self._resolver
        if self._servers:
            stub = dns.asyncresolver.Resolver(configure=False)
            stub.nameservers = self._servers
        else:
            try:
                stub = dns.asyncresolver.Resolver(configure=True)
            except dns.exception.DNSException as exc:
                raise DnsTemporaryError(
                    f"no usable system DNS configuration: {exc}", _DNS_TEMPFAIL
                ) from exc
            self._trust_ad = all(_loopback(str(ns)) for ns in stub.nameservers)
        stub.lifetime = self._timeout
        # RFC 6840 §5.7: AD in a query asks a validating resolver to report the result.
        stub.flags = dns.flags.RD | dns.flags.AD
        stub.timeout = min(self._timeout, _ATTEMPT_TIMEOUT)
        # EDNS0 with dnspython's 1232-byte payload (DNS flag day 2020) keeps large MX
        # sets on UDP; truncated answers are retried over TCP by dnspython.
        stub.use_edns(0)
        # Answers are reused for their TTL (dnspython's cache honours it): a queue
        # full of mail for one domain must not cost three lookups per message.
        stub.cache = dns.resolver.LRUCache(_CACHE_ENTRIES)
        self._resolver = stub
        return stub

    async def mail_hosts(self, domain: str) -> list[MailHost]:
        """The hosts to try for *domain*, best first (RFC 5321 §5.1)."""
        name = _to_name(domain, _NO_SUCH_DOMAIN)
        shown = _text(name)
        try:
            answer = await self._query(name, dns.rdatatype.MX)
        except dns.resolver.NXDOMAIN as exc:
            raise DnsPermanentError(
                f"domain {shown} does not exist (NXDOMAIN)", _NO_SUCH_DOMAIN
            ) from exc
        mx_secure = self._secure(answer)
        if answer.rrset is None:
            return [await self._implicit_mx(name, mx_secure)]
        records = [rd for rd in answer.rrset if isinstance(rd, MX)]
        # RFC 7505 §3: a lone MX whose exchange is the root says "no mail here".
        # Root exchanges mixed with real ones are malformed; they are simply not hosts.
        if all(rd.exchange == dns.name.root for rd in records):
            raise DnsPermanentError(
                f"domain {shown} does not accept mail (null MX, RFC 7505)", _NULL_MX
            )
        ordered = _order(rd for rd in records if rd.exchange != dns.name.root)
        lookups: list[_HostLookup] = [_HostLookup() for _ in ordered]
        async with trio.open_nursery() as nursery:
            for (_, target), slot in zip(ordered, lookups, strict=True):
                nursery.start_soon(self._lookup_into, target, slot)
        hosts: list[MailHost] = []
        problems: list[str] = []
        temporary = False
        for (preference, target), found in zip(ordered, lookups, strict=True):
            if found.aliased:
                # RFC 2181 §10.3: an MX exchange must not be an alias (CNAME).
                problems.append(f"MX {_text(target)} is an alias (CNAME)")
            elif found.v6 or found.v4:
                hosts.append(
                    MailHost(
                        _text(target),
                        preference,
                        self._interleave(found),
                        mx_secure and not found.insecure,
                    )
                )
            elif found.error is not None:
                temporary = True
                problems.append(str(found.error))
            else:
                problems.append(f"MX {_text(target)} has no A/AAAA records")
        if hosts:
            return hosts
        summary = f"no usable mail host for {shown}: " + "; ".join(problems)
        if temporary:
            raise DnsTemporaryError(summary, _DNS_TEMPFAIL)
        raise DnsPermanentError(summary, _NO_ROUTE)

    async def addresses(self, host: str) -> tuple[str, ...]:
        """The addresses of *host* in connection order (RFC 8305 §4); CNAMEs are followed.

        One family failing temporarily does not hide the other: what was found is used.
        """
        name = _to_name(host, _NO_ROUTE)
        found = _HostLookup()
        await self._lookup_into(name, found)
        if found.v6 or found.v4:
            return self._interleave(found)
        if found.error is not None:
            raise found.error
        raise DnsPermanentError(f"host {_text(name)} has no A/AAAA records", _NO_ROUTE)

    async def records(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """The *rdtype* records at *name*, CNAMEs followed (mail authentication's lookups).

        NXDOMAIN and "no such type" are both ``[]``: SPF (void lookups), DKIM (no key)
        and DMARC (no policy) treat them alike. A name that is not a valid domain is
        ``[]`` too. Every other failure is :class:`DnsTemporaryError`.
        """
        cached = self.peek(name, rdtype)
        if cached is not None:
            return cached
        try:
            qname = dns.name.from_text(name.strip())
        except dns.exception.DNSException:
            return []
        try:
            answer = await self._query(qname, dns.rdatatype.from_text(rdtype))
        except dns.resolver.NXDOMAIN:
            return []
        if answer.rrset is None:
            return []
        found = list(answer.rrset)
        if len(self._records) >= _CACHE_ENTRIES:
            self._records.clear()  # crude but bounded; a refill costs one lookup each
        self._records[(name.strip().lower().rstrip("."), rdtype)] = (answer.expiration, found)
        return found

    def expiry(self, name: str, rdtype: str) -> float | None:
        """When the cached :meth:`records` answer for *name* runs out (wall clock), or None."""
        if self.peek(name, rdtype) is None:
            return None
        return self._records[(name.strip().lower().rstrip("."), rdtype)][0]

    def peek(self, name: str, rdtype: str) -> list[dns.rdata.Rdata] | None:
        """What :meth:`records` would answer from its cache right now, or None (no I/O)."""
        key = (name.strip().lower().rstrip("."), rdtype)
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry[0] <= time.time():  # dnspython's expiration is wall-clock time
            del self._records[key]
            return None
        return entry[1]

    async def tlsa(self, host: str, port: int) -> TlsaAnswer:
        """The TLSA records of *host* for TCP *port* (RFC 6698 §3); none when absent.

        A failed lookup raises :class:`DnsTemporaryError`: for a host whose MX and
        addresses are authenticated that means "do not deliver there now"
        (RFC 7672 §2.2), which only the caller can decide.
        """
        name = _to_name(f"_{port}._tcp.{host.rstrip('.')}", _NO_ROUTE)
        try:
            answer = await self._query(name, dns.rdatatype.TLSA)
        except dns.resolver.NXDOMAIN:
            return TlsaAnswer(_text(name), (), False)
        records = tuple(
            TlsaRecord(rd.usage, rd.selector, rd.mtype, bytes(rd.cert))
            for rd in (answer.rrset or ())
            if isinstance(rd, TLSA)
        )
        return TlsaAnswer(_text(name), records, self._secure(answer))

    async def txt(self, name: str) -> list[tuple[str, ...]]:
        """The TXT records at *name*, each as its character-strings; [] when none."""
        owner = _to_name(name, _NO_ROUTE)
        try:
            answer = await self._query(owner, dns.rdatatype.TXT)
        except dns.resolver.NXDOMAIN:
            return []
        return [
            tuple(s.decode("utf-8", "replace") for s in rd.strings)
            for rd in (answer.rrset or ())
            if isinstance(rd, TXT)
        ]

    def _secure(self, answer: dns.resolver.Answer) -> bool:
        return self._trust_ad and bool(answer.response.flags & dns.flags.AD)

    async def _implicit_mx(self, name: dns.name.Name, mx_secure: bool = False) -> MailHost:
        """RFC 5321 §5.1: without MX records the domain itself is the host, preference 0.

        Here a CNAME is fine: §5.1 says to process the canonical name as the domain.
        """
        found = _HostLookup()
        await self._lookup_into(name, found)
        if found.v6 or found.v4:
            return MailHost(
                _text(name), 0, self._interleave(found), mx_secure and not found.insecure
            )
        if found.error is not None:
            raise found.error
        raise DnsPermanentError(
            f"domain {_text(name)} has no MX and no A/AAAA records", _NO_SUCH_DOMAIN
        )

    async def _lookup_into(self, name: dns.name.Name, found: _HostLookup) -> None:
        """Fill *found* with the AAAA and A answers, queried concurrently."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._family_into, name, dns.rdatatype.AAAA, found)
            nursery.start_soon(self._family_into, name, dns.rdatatype.A, found)

    async def _family_into(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, found: _HostLookup
    ) -> None:
        try:
            answer = await self._query(name, rdtype)
        except dns.resolver.NXDOMAIN:
            return
        except DnsTemporaryError as exc:
            found.error = found.error or exc
            return
        if answer.canonical_name != name:
            found.aliased = True
        if answer.rrset is None:
            return
        if not self._secure(answer):
            found.insecure = True
        for rd in answer.rrset:
            if isinstance(rd, AAAA):
                found.v6.append(rd.address)
            elif isinstance(rd, A):
                found.v4.append(rd.address)

    async def _query(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.resolver.Answer:
        """One lookup; NXDOMAIN passes through, every other failure is temporary.

        Unknown failures count as temporary on purpose: retrying a message is cheap,
        bouncing it because of a resolver hiccup is not.
        """
        stub = self._stub()
        what = f"{_text(name)} {rdtype.name}"
        try:
            return await stub.resolve(
                name, rdtype, search=False, raise_on_no_answer=False, backend=self._backend
            )
        except dns.resolver.NXDOMAIN:
            raise
        except dns.exception.Timeout as exc:
            raise DnsTemporaryError(
                f"DNS lookup of {what} timed out after {self._timeout:g}s", _DNS_TEMPFAIL
            ) from exc
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(
                f"DNS lookup of {what} failed: {_server_errors(exc)}", _DNS_TEMPFAIL
            ) from exc
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(f"DNS lookup of {what} failed: {exc}", _DNS_TEMPFAIL) from exc

    def _interleave(self, found: _HostLookup) -> tuple[str, ...]:
        """Alternate families, preferred one first (RFC 8305 §4), leftovers at the end."""
        first, second = (found.v4, found.v6) if self._prefer_ipv4 else (found.v6, found.v4)
        out: list[str] = []
        for index in range(max(len(first), len(second))):
            out.extend(family[index] for family in (first, second) if index < len(family))
        return tuple(out)


def _to_name(text: str, status: str) -> dns.name.Name:
    """Absolute name; dnspython turns UTF-8 labels into A-labels (IDNA)."""
    try:
        name = dns.name.from_text(text.strip())
    except dns.exception.DNSException as exc:
        raise DnsPermanentError(f"invalid domain name {text!r}: {exc}", status) from exc
    if name == dns.name.root:
        raise DnsPermanentError(f"invalid domain name {text!r}: empty", status)
    return name


def _loopback(server: str) -> bool:
    """A system name server on this host (``127.0.0.53``, ``::1``): a trusted path."""
    address = server.removeprefix("Do53:").rsplit("@", 1)[0]
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _text(name: dns.name.Name) -> str:
    return name.canonicalize().to_text(omit_final_dot=True)


def _order(records: Iterable[MX]) -> list[tuple[int, dns.name.Name]]:
    """Sort by preference, random among equals (RFC 5321 §5.1) to spread the load."""
    by_preference: dict[int, list[dns.name.Name]] = {}
    for rd in records:
        by_preference.setdefault(rd.preference, []).append(rd.exchange.canonicalize())
    ordered: list[tuple[int, dns.name.Name]] = []
    for preference in sorted(by_preference):
        group = by_preference[preference]
        random.shuffle(group)
        ordered.extend((preference, target) for target in group)
    return ordered


def _server_errors(exc: dns.resolver.NoNameservers) -> str:
    """One short 'server answered SERVFAIL' per server instead of dnspython's long text."""
    parts: list[str] = []
    for nameserver, _tcp, _port, error, response in exc.kwargs.get("errors", []):
        server = str(nameserver).removeprefix("Do53:")
        if response is not None:
            parts.append(f"{server} answered {dns.rcode.to_text(response.rcode())}")
        else:
            parts.append(f"{server}: {error or type(error).__name__}")
    return "; ".join(parts) or "no name server answered"
