"""A small authoritative DNS server on 127.0.0.1 for tests (UDP and TCP, same port).

It runs in a daemon thread with plain sockets, so it answers trio tests in this
process and MTA subprocesses alike, and it speaks real DNS wire format through
dnspython, so the resolver under test is exercised end to end. Failure modes a
test needs on demand: SERVFAIL for a name, and silence (timeouts) for a name.
Answers can carry the AD bit, as a validating resolver's would, for DANE tests.

    with FakeDNS() as fake:
        fake.add("example.test", "MX", "10 mx.example.test.")
        config = {"dns": {"nameservers": [fake.nameserver]}}
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME

__all__ = ["FakeDNS"]

TTL = 60
MAX_CNAME_CHAIN = 8
_UDP_PLAIN_LIMIT = 512  # RFC 1035 §4.2.1: UDP size without EDNS


@dataclass(frozen=True)
class _Record:
    rdtype: dns.rdatatype.RdataType
    rdata: str
    ttl: int
    authenticated: bool


class FakeDNS:
    """Serves a table of records; names are case-insensitive, the final dot optional.

    A name exists when it owns records or lies above one that does (an empty
    non-terminal, RFC 8020): other names get NXDOMAIN, an existing name without the
    asked type gets NOERROR with an empty answer. A CNAME answers every type but
    CNAME, followed by the target's records when the target is in the table.

    The AD bit plays a validating resolver for DANE tests (nothing is signed: AD
    is the claim a trusted resolver makes, which is all an MTA looks at). It is set
    only for a query that asks with AD or DO, as RFC 6840 §5.7-5.8 has a resolver
    do, so a client that forgets to ask gets no AD here either; and then, with
    ``authenticated=True``, on every answer (denials included) except for names
    passed to :meth:`unauthenticated`, or else on answers whose records were all
    added with ``add(..., authenticated=True)``.
    """

    def __init__(
        self,
        records: dict[str, list[tuple[str, str]]] | None = None,
        *,
        authenticated: bool = False,
    ) -> None:
        self._lock = threading.Lock()
        self._records: dict[dns.name.Name, list[_Record]] = {}
        self.authenticated = authenticated
        self._insecure: set[dns.name.Name] = set()
        self._servfail: set[dns.name.Name] = set()
        self._blackhole: set[dns.name.Name] = set()
        self.queries: list[tuple[str, str]] = []
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._stopping = False
        for name, entries in (records or {}).items():
            for rdtype, rdata in entries:
                self.add(name, rdtype, rdata)

    # --- the table -------------------------------------------------------------

    def add(
        self, name: str, rdtype: str, rdata: str, *, ttl: int = TTL, authenticated: bool = False
    ) -> None:
        """Add one record (MX, A, AAAA, TXT, TLSA, CNAME, any type dnspython knows).

        ``rdata`` is presentation format: ``"10 mx.example.test."``, ``'"v=spf1 -all"'``,
        ``"3 1 1 <hex>"``. Bad rdata fails here, in the test, not in the server thread.
        Records of one name and type form one RRset, answered with their smallest TTL.
        """
        owner = dns.name.from_text(name)
        kind = dns.rdatatype.from_text(rdtype)
        dns.rrset.from_text(owner, ttl, dns.rdataclass.IN, kind, rdata)
        with self._lock:
            self._records.setdefault(owner, []).append(_Record(kind, rdata, ttl, authenticated))

    def clear(self) -> None:
        """Forget every record, SERVFAIL and blackhole name, and the query log."""
        with self._lock:
            self._records.clear()
            self._servfail.clear()
            self._blackhole.clear()
            self._insecure.clear()
            self.queries.clear()

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``, the form ``[dns] nameservers`` takes."""
        host, port = self.address
        return f"{host}:{port}"

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL to every question about *name*."""
        with self._lock:
            self._servfail.add(dns.name.from_text(name))

    def unauthenticated(self, name: str) -> None:
        """Answer questions about *name* without the AD bit (an unsigned zone)."""
        with self._lock:
            self._insecure.add(dns.name.from_text(name))

    def blackhole(self, name: str) -> None:
        """Never answer questions about *name*, so the client times out."""
        with self._lock:
            self._blackhole.add(dns.name.from_text(name))

    # --- life cycle --------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Bind UDP and TCP on one free loopback port and start serving."""
        udp, tcp = _bind_pair()
        self.address = ("127.0.0.1", udp.getsockname()[1])
        self._wake = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._serve, args=(udp, tcp, self._wake[1]), name="FakeDNS", daemon=True
        )
        self._thread.start()
        return self.address

    def stop(self) -> None:
        if self._thread is None or self._wake is None:
            return
        self._stopping = True
        self._wake[0].send(b"x")
        self._thread.join(timeout=5)
        # Both ends are closed here, never by the thread: it may see _stopping and
        # leave before the byte above is sent, and that send must not hit a closed peer.
        for end in self._wake:
            end.close()
        self._thread = None
        self._wake = None

    def __enter__(self) -> FakeDNS:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- answering ---------------------------------------------------------------

    def answer(self, wire: bytes, *, udp: bool) -> bytes | None:
        """The response to one query in wire format, or None to stay silent.

        Over UDP an answer longer than the client's limit (512 bytes, or its EDNS
        payload size) is truncated with TC set, so that the client retries over TCP.
        """
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname, qtype = question.name, dns.rdatatype.RdataType(question.rdtype)
        self.queries.append((qname.canonicalize().to_text(), qtype.name))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        # RFC 6840 §5.7-5.8: AD only for a client that signals it understands it.
        wants_ad = bool(query.flags & dns.flags.AD) or bool(query.ednsflags & dns.flags.DO)
        with self._lock:
            if qname in self._blackhole:
                return None
            if qname in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            else:
                signed = self._fill(response, qname, qtype)
                if self.authenticated:
                    signed = qname not in self._insecure
                if signed and wants_ad:
                    response.flags |= dns.flags.AD
        # Records go out in the order they were added: dnspython would shuffle them
        # (want_shuffle), which would hide whether the client itself shuffles.
        if not udp:
            return response.to_wire(max_size=65535, want_shuffle=False)
        limit = max(_UDP_PLAIN_LIMIT, query.payload if query.edns >= 0 else 0)
        return response.to_wire(max_size=limit, prefer_truncation=True, want_shuffle=False)

    def _fill(
        self, response: dns.message.Message, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
    ) -> bool:
        """Answer section and rcode for qname/qtype; the caller holds the lock.

        Returns whether the records make the answer authenticated: it is non-empty and
        every record in it (CNAMEs included) was added with ``authenticated=True``.
        """
        name = qname
        used: list[_Record] = []
        for _ in range(MAX_CNAME_CHAIN):
            owned = self._records.get(name)
            if owned is None:
                if name == qname and not self._exists(name):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                break
            alias = [r for r in owned if r.rdtype == dns.rdatatype.CNAME]
            if alias and qtype != dns.rdatatype.CNAME:
                cname = self._rrset(name, dns.rdatatype.CNAME, alias[:1])
                response.answer.append(cname)
                used += alias[:1]
                target = cname[0]
                assert isinstance(target, CNAME)
                name = target.target
                continue
            matching = [r for r in owned if r.rdtype == qtype]
            if matching:
                response.answer.append(self._rrset(name, qtype, matching))
                used += matching
                return self.authenticated or all(r.authenticated for r in used)
            break
        return False

    def _exists(self, name: dns.name.Name) -> bool:
        return any(owner.is_subdomain(name) for owner in self._records)

    @staticmethod
    def _rrset(
        name: dns.name.Name, rdtype: dns.rdatatype.RdataType, records: list[_Record]
    ) -> dns.rrset.RRset:
        ttl = min(r.ttl for r in records)
        return dns.rrset.from_text(
            name, ttl, dns.rdataclass.IN, rdtype, *[r.rdata for r in records]
        )

    # --- the server thread -------------------------------------------------------

    def _serve(self, udp: socket.socket, tcp: socket.socket, wake: socket.socket) -> None:
        buffers: dict[socket.socket, bytes] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(udp, selectors.EVENT_READ)
            selector.register(tcp, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            try:
                while not self._stopping:
                    for key, _ in selector.select():
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        if sock is udp:
                            self._udp_once(udp)
                        elif sock is tcp:
                            conn, _ = tcp.accept()
                            buffers[conn] = b""
                            selector.register(conn, selectors.EVENT_READ)
                        elif sock is not wake and not self._tcp_once(sock, buffers):
                            selector.unregister(sock)
                            del buffers[sock]
                            sock.close()
            finally:
                for sock in [udp, tcp, *buffers]:
                    sock.close()

    def _udp_once(self, udp: socket.socket) -> None:
        try:
            wire, peer = udp.recvfrom(65535)
        except OSError:
            return
        reply = self.answer(wire, udp=True)
        if reply is not None:
            with contextlib.suppress(OSError):  # the client is gone: nothing to do
                udp.sendto(reply, peer)

    def _tcp_once(self, conn: socket.socket, buffers: dict[socket.socket, bytes]) -> bool:
        """Read what is there, answer every complete query (RFC 1035 §4.2.2 framing)."""
        try:
            chunk = conn.recv(65535)
        except OSError:
            return False
        if not chunk:
            return False
        data = buffers[conn] + chunk
        while len(data) >= 2:
            (length,) = struct.unpack("!H", data[:2])
            if len(data) < 2 + length:
                break
            reply = self.answer(data[2 : 2 + length], udp=False)
            data = data[2 + length :]
            if reply is not None:
                try:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
                except OSError:  # the client gave up (its timeout) and hung up
                    return False
        buffers[conn] = data
        return True


def _bind_pair() -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same free port: a DNS server address is one port."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise OSError("no loopback port free for both UDP and TCP")
