"""trio_mta.testing.FakeDNS answers real DNS queries: dnspython over UDP and TCP, and
trio_mta's own resolver configured through ``[dns] nameservers``."""

from __future__ import annotations

from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from trio_mta.config import Config
from trio_mta.dns import Resolver
from trio_mta.testing import FakeDNS

TLSA = "3 1 1 " + "ab" * 32


def ask(
    server: FakeDNS,
    name: str,
    rdtype: str,
    *,
    tcp: bool = False,
    want_dnssec: bool = False,
    ad: bool = False,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, want_dnssec=want_dnssec)
    if ad:
        query.flags |= dns.flags.AD
    host, port = server.address
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, host, port=port, timeout=5)


@pytest.fixture
def server() -> FakeDNS:
    with FakeDNS() as fake:
        yield fake  # type: ignore[misc]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_each_record_type_is_answered(server: FakeDNS, tcp: bool) -> None:
    records = {
        ("example.test", "MX"): "10 mx.example.test.",
        ("mx.example.test", "A"): "127.0.0.1",
        ("mx.example.test", "AAAA"): "::1",
        ("example.test", "TXT"): '"v=spf1 -all"',
        ("_25._tcp.mx.example.test", "TLSA"): TLSA,
        ("alias.example.test", "CNAME"): "mx.example.test.",
    }
    for (name, rdtype), rdata in records.items():
        server.add(name, rdtype, rdata)
    for (name, rdtype), rdata in records.items():
        response = ask(server, name, rdtype, tcp=tcp)
        assert response.rcode() == dns.rcode.NOERROR
        assert [rd.to_text() for rd in response.answer[0]] == [rdata]
        assert response.flags & dns.flags.AA


def test_unknown_names_are_nxdomain_and_missing_types_are_nodata(server: FakeDNS) -> None:
    server.add("mx.example.test", "A", "127.0.0.1")
    assert ask(server, "nothere.test", "MX").rcode() == dns.rcode.NXDOMAIN
    nodata = ask(server, "mx.example.test", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and nodata.answer == []
    # example.test owns nothing but lies above a name that does (RFC 8020): NODATA too.
    assert ask(server, "example.test", "MX").rcode() == dns.rcode.NOERROR


def test_cname_is_followed_to_the_target(server: FakeDNS) -> None:
    server.add("www.example.test", "CNAME", "host.example.test.")
    server.add("host.example.test", "A", "127.0.0.5")
    answer = ask(server, "www.example.test", "A").answer
    assert [rrset.rdtype for rrset in answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert answer[1][0].to_text() == "127.0.0.5"


def test_ttl_per_record_and_smallest_per_rrset(server: FakeDNS) -> None:
    server.add("example.test", "MX", "10 a.example.test.", ttl=300)
    server.add("example.test", "MX", "20 b.example.test.", ttl=30)
    server.add("example.test", "TXT", '"x"')
    assert ask(server, "example.test", "MX").answer[0].ttl == 30
    assert ask(server, "example.test", "TXT").answer[0].ttl == 60


def test_ad_bit_only_for_authenticated_records_and_clients_that_ask(server: FakeDNS) -> None:
    """RFC 6840 §5.7-5.8: a resolver sets AD only when the query had AD or DO set."""
    server.add("mx.example.test", "TLSA", TLSA, authenticated=True)
    server.add("plain.example.test", "TLSA", TLSA)
    assert ask(server, "mx.example.test", "TLSA", want_dnssec=True).flags & dns.flags.AD
    assert ask(server, "mx.example.test", "TLSA", ad=True).flags & dns.flags.AD
    assert not ask(server, "mx.example.test", "TLSA").flags & dns.flags.AD
    assert not ask(server, "plain.example.test", "TLSA", ad=True).flags & dns.flags.AD
    assert not ask(server, "nothere.example.test", "TLSA", ad=True).flags & dns.flags.AD


def test_a_cname_chain_is_authenticated_only_when_every_link_is(server: FakeDNS) -> None:
    server.add("alias.test", "CNAME", "target.test.")
    server.add("target.test", "A", "127.0.0.1", authenticated=True)
    assert not ask(server, "alias.test", "A", ad=True).flags & dns.flags.AD


def test_a_validating_resolver_signs_everything_but_unsigned_zones() -> None:
    """``authenticated=True``: AD on answers and denials alike, except unauthenticated()."""
    with FakeDNS(authenticated=True) as signed:
        signed.add("alias.test", "CNAME", "target.test.")
        signed.add("target.test", "A", "127.0.0.1")
        signed.add("plain.test", "A", "127.0.0.1")
        signed.unauthenticated("plain.test")
        assert ask(signed, "alias.test", "A", ad=True).flags & dns.flags.AD
        assert ask(signed, "nothere.test", "TLSA", want_dnssec=True).flags & dns.flags.AD
        assert not ask(signed, "plain.test", "A", ad=True).flags & dns.flags.AD
        assert not ask(signed, "target.test", "A").flags & dns.flags.AD


def test_servfail_blackhole_and_clear(server: FakeDNS) -> None:
    server.add("broken.test", "A", "127.0.0.1")
    server.servfail("broken.test")
    assert ask(server, "broken.test", "A").rcode() == dns.rcode.SERVFAIL
    server.blackhole("silent.test")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(
            dns.message.make_query("silent.test", "A"),
            server.address[0],
            port=server.address[1],
            timeout=0.3,
        )
    server.clear()
    assert ask(server, "broken.test", "A").rcode() == dns.rcode.NXDOMAIN
    assert server.queries == [("broken.test.", "A")]


def test_bad_rdata_fails_in_the_test_not_the_server(server: FakeDNS) -> None:
    with pytest.raises(dns.exception.SyntaxError):
        server.add("example.test", "MX", "not a preference")


async def test_nameserver_goes_into_the_config_and_routes_mail(
    server: FakeDNS, tmp_path: Path
) -> None:
    server.add("example.test", "MX", "20 backup.example.test.")
    server.add("example.test", "MX", "10 mx.example.test.")
    server.add("mx.example.test", "A", "127.0.0.1")
    server.add("backup.example.test", "A", "127.0.0.2")
    assert server.nameserver == f"127.0.0.1:{server.address[1]}"
    config = Config.from_mapping({"dns": {"nameservers": [server.nameserver]}}, base_dir=tmp_path)
    resolver = Resolver(config.dns.nameservers, config.dns.timeout)
    hosts = await resolver.mail_hosts("example.test")
    assert [(h.name, h.addresses) for h in hosts] == [
        ("mx.example.test", ("127.0.0.1",)),
        ("backup.example.test", ("127.0.0.2",)),
    ]


def test_stop_closes_both_sockets() -> None:
    with FakeDNS() as fake:
        host, port = fake.address
    import socket

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5).close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, port))  # free again
    udp.close()
