"""trio_mta.dns against a real name server on loopback (never the system resolver)."""

from __future__ import annotations

import random

import pytest
import trio

from tests.dnsserver import DnsServer
from trio_mta.dns import DnsPermanentError, DnsTemporaryError, MailHost, Resolver


def resolver(dns: DnsServer, *, timeout: float = 2.0, prefer_ipv4: bool = False) -> Resolver:
    return Resolver([dns.address], timeout=timeout, prefer_ipv4=prefer_ipv4)


# --- MX ordering -------------------------------------------------------------------


async def test_mx_hosts_sorted_by_preference_with_their_addresses() -> None:
    records = {
        "example.test": [
            ("MX", "20 b.example.test."),
            ("MX", "30 c.example.test."),
            ("MX", "10 a.example.test."),
        ],
        "a.example.test": [("A", "127.0.0.1")],
        "b.example.test": [("A", "127.0.0.2")],
        "c.example.test": [("AAAA", "::3")],
    }
    with DnsServer(records) as dns:
        hosts = await resolver(dns).mail_hosts("example.test")
    assert hosts == [
        MailHost("a.example.test", 10, ("127.0.0.1",)),
        MailHost("b.example.test", 20, ("127.0.0.2",)),
        MailHost("c.example.test", 30, ("::3",)),
    ]


async def test_equal_preferences_are_shuffled_but_never_jump_ahead() -> None:
    records = {
        "example.test": [
            ("MX", "10 a.example.test."),
            ("MX", "10 b.example.test."),
            ("MX", "5 first.example.test."),
        ],
        "a.example.test": [("A", "127.0.0.1")],
        "b.example.test": [("A", "127.0.0.2")],
        "first.example.test": [("A", "127.0.0.5")],
    }
    random.seed(20261127)  # deterministic run; 30 fair shuffles all alike would be 2**-29
    orders: set[tuple[str, ...]] = set()
    with DnsServer(records) as dns:
        lookup = resolver(dns)
        for _ in range(30):
            hosts = await lookup.mail_hosts("example.test")
            orders.add(tuple(host.name for host in hosts))
    assert orders == {
        ("first.example.test", "a.example.test", "b.example.test"),
        ("first.example.test", "b.example.test", "a.example.test"),
    }


async def test_large_mx_set_is_fetched_over_tcp_after_truncation() -> None:
    count = 60
    records: dict[str, list[tuple[str, str]]] = {
        "big.test": [("MX", f"{n} mail-exchanger-{n:02d}.big.test.") for n in range(count)]
    }
    for n in range(count):
        records[f"mail-exchanger-{n:02d}.big.test"] = [("A", f"127.0.1.{n}")]
    with DnsServer(records) as dns:
        hosts = await resolver(dns).mail_hosts("big.test")
    assert [host.preference for host in hosts] == list(range(count))
    assert hosts[-1] == MailHost(f"mail-exchanger-{count - 1}.big.test", count - 1, ("127.0.1.59",))
    # The UDP answer came back truncated (TC), so the resolver asked again over TCP.
    assert dns.queries.count(("big.test.", "MX")) == 2


async def test_mid_sized_mx_set_fits_one_edns_udp_answer() -> None:
    """Over 512 bytes (the plain DNS limit) but under EDNS0's 1232: no TCP retry."""
    count = 20
    records: dict[str, list[tuple[str, str]]] = {
        "mid.test": [("MX", f"{n} mail-exchanger-{n:02d}.mid.test.") for n in range(count)]
    }
    for n in range(count):
        records[f"mail-exchanger-{n:02d}.mid.test"] = [("A", f"127.0.1.{n}")]
    with DnsServer(records) as dns:
        hosts = await resolver(dns).mail_hosts("mid.test")
    assert len(hosts) == count
    assert dns.queries.count(("mid.test.", "MX")) == 1


# --- null MX and the implicit MX ---------------------------------------------------


async def test_null_mx_is_a_permanent_5_1_10() -> None:
    with (
        DnsServer({"nomail.test": [("MX", "0 ."), ("A", "127.0.0.1")]}) as dns,
        pytest.raises(DnsPermanentError) as caught,
    ):
        await resolver(dns).mail_hosts("nomail.test")
    assert caught.value.permanent
    assert caught.value.status == "5.1.10"
    assert "null MX" in str(caught.value)
    # RFC 7505 §4.1: no fallback to the A record either.
    assert ("nomail.test.", "A") not in dns.queries


async def test_root_exchange_mixed_with_real_hosts_is_just_skipped() -> None:
    records = {
        "mixed.test": [("MX", "0 ."), ("MX", "10 mx.mixed.test.")],
        "mx.mixed.test": [("A", "127.0.0.7")],
    }
    with DnsServer(records) as dns:
        hosts = await resolver(dns).mail_hosts("mixed.test")
    assert hosts == [MailHost("mx.mixed.test", 10, ("127.0.0.7",))]


async def test_no_mx_falls_back_to_the_domains_own_addresses() -> None:
    records = {"plain.test": [("A", "127.0.0.8"), ("AAAA", "::8"), ("TXT", '"v=spf1 -all"')]}
    with DnsServer(records) as dns:
        hosts = await resolver(dns).mail_hosts("plain.test")
    assert hosts == [MailHost("plain.test", 0, ("::8", "127.0.0.8"))]
    assert dns.queries[0] == ("plain.test.", "MX")


async def test_no_mx_and_no_addresses_is_a_permanent_5_1_2() -> None:
    with (
        DnsServer({"txtonly.test": [("TXT", '"hello"')]}) as dns,
        pytest.raises(DnsPermanentError) as caught,
    ):
        await resolver(dns).mail_hosts("txtonly.test")
    assert caught.value.status == "5.1.2"
    assert "no MX and no A/AAAA" in str(caught.value)


async def test_implicit_mx_follows_a_cname_of_the_domain() -> None:
    records = {
        "alias.test": [("CNAME", "real.test.")],
        "real.test": [("A", "127.0.0.9")],
    }
    with DnsServer(records) as dns:
        hosts = await resolver(dns).mail_hosts("alias.test")
    assert hosts == [MailHost("alias.test", 0, ("127.0.0.9",))]


# --- address order -----------------------------------------------------------------


DUAL = {
    "dual.test": [
        ("AAAA", "2001:db8::1"),
        ("AAAA", "2001:db8::2"),
        ("A", "127.0.0.1"),
        ("A", "127.0.0.2"),
        ("A", "127.0.0.3"),
    ]
}


async def test_addresses_interleave_families_ipv6_first() -> None:
    with DnsServer(DUAL) as dns:
        found = await resolver(dns).addresses("dual.test")
    assert found == ("2001:db8::1", "127.0.0.1", "2001:db8::2", "127.0.0.2", "127.0.0.3")
    assert {("dual.test.", "AAAA"), ("dual.test.", "A")} <= set(dns.queries)


async def test_prefer_ipv4_puts_ipv4_first() -> None:
    records = {"example.test": [("MX", "10 dual.test.")], **DUAL}
    with DnsServer(records) as dns:
        found = await resolver(dns, prefer_ipv4=True).addresses("dual.test")
        hosts = await resolver(dns, prefer_ipv4=True).mail_hosts("example.test")
    assert found == ("127.0.0.1", "2001:db8::1", "127.0.0.2", "2001:db8::2", "127.0.0.3")
    assert hosts == [MailHost("dual.test", 10, found)]


async def test_addresses_follow_a_cname() -> None:
    records = {"www.test": [("CNAME", "host.test.")], "host.test": [("AAAA", "::1")]}
    with DnsServer(records) as dns:
        assert await resolver(dns).addresses("www.test") == ("::1",)


async def test_addresses_of_a_missing_host_are_a_permanent_5_4_4() -> None:
    with (
        DnsServer({"other.test": [("A", "127.0.0.1")]}) as dns,
        pytest.raises(DnsPermanentError) as caught,
    ):
        await resolver(dns).addresses("missing.test")
    assert caught.value.status == "5.4.4"


# --- unusable MX targets -----------------------------------------------------------


async def test_mx_target_that_is_a_cname_is_skipped() -> None:
    records = {
        "example.test": [("MX", "10 alias.example.test."), ("MX", "20 mx.example.test.")],
        # The alias leads to a working host: skipping it is because of the CNAME alone.
        "alias.example.test": [("CNAME", "mx.example.test.")],
        "mx.example.test": [("A", "127.0.0.2")],
    }
    with DnsServer(records) as dns:
        hosts = await resolver(dns).mail_hosts("example.test")
    assert hosts == [MailHost("mx.example.test", 20, ("127.0.0.2",))]


async def test_mx_target_without_addresses_is_skipped() -> None:
    records = {
        "example.test": [
            ("MX", "10 noaddr.example.test."),
            ("MX", "20 gone.example.test."),
            ("MX", "30 mx.example.test."),
        ],
        "noaddr.example.test": [("TXT", '"no address here"')],
        "mx.example.test": [("A", "127.0.0.3")],
    }
    with DnsServer(records) as dns:
        hosts = await resolver(dns).mail_hosts("example.test")
    assert hosts == [MailHost("mx.example.test", 30, ("127.0.0.3",))]


async def test_all_mx_targets_unusable_is_a_permanent_5_4_4() -> None:
    records = {
        "example.test": [("MX", "10 alias.example.test."), ("MX", "20 gone.example.test.")],
        "alias.example.test": [("CNAME", "mx.example.test.")],
        "mx.example.test": [("A", "127.0.0.2")],
    }
    with DnsServer(records) as dns, pytest.raises(DnsPermanentError) as caught:
        await resolver(dns).mail_hosts("example.test")
    assert caught.value.status == "5.4.4"
    assert "alias.example.test is an alias" in str(caught.value)
    assert "gone.example.test has no A/AAAA" in str(caught.value)


async def test_all_mx_targets_unusable_with_one_lookup_failing_is_temporary() -> None:
    records = {
        "example.test": [("MX", "10 broken.example.test."), ("MX", "20 gone.example.test.")],
        "broken.example.test": [("A", "127.0.0.2")],
    }
    with DnsServer(records) as dns:
        dns.servfail("broken.example.test")
        with pytest.raises(DnsTemporaryError) as caught:
            await resolver(dns).mail_hosts("example.test")
    assert not caught.value.permanent
    assert caught.value.status == "4.4.3"


# --- failures of the domain itself -------------------------------------------------


@pytest.mark.parametrize("domain", ["nowhere.test", "sub.example.test"])
async def test_nxdomain_is_a_permanent_5_1_2(domain: str) -> None:
    with (
        DnsServer({"example.test": [("MX", "10 mx.example.test.")]}) as dns,
        pytest.raises(DnsPermanentError) as caught,
    ):
        await resolver(dns).mail_hosts(domain)
    assert caught.value.permanent
    assert caught.value.status == "5.1.2"
    assert "NXDOMAIN" in str(caught.value)


async def test_empty_non_terminal_is_nodata_not_nxdomain() -> None:
    """'test.' owns nothing but has records below it: it exists (RFC 8020)."""
    with (
        DnsServer({"mx.parent.test": [("A", "127.0.0.1")]}) as dns,
        pytest.raises(DnsPermanentError) as caught,
    ):
        await resolver(dns).mail_hosts("parent.test")
    assert "no MX and no A/AAAA" in str(caught.value)


async def test_servfail_is_a_temporary_4_4_3() -> None:
    with DnsServer({"example.test": [("MX", "10 mx.example.test.")]}) as dns:
        dns.servfail("example.test")
        with pytest.raises(DnsTemporaryError) as caught:
            await resolver(dns).mail_hosts("example.test")
    assert caught.value.status == "4.4.3"
    assert "SERVFAIL" in str(caught.value)


async def test_silent_server_is_a_temporary_4_4_3_after_the_timeout() -> None:
    with DnsServer({"example.test": [("MX", "10 mx.example.test.")]}) as dns:
        dns.blackhole("example.test")
        with trio.fail_after(5), pytest.raises(DnsTemporaryError) as caught:
            await resolver(dns, timeout=0.5).mail_hosts("example.test")
    assert caught.value.status == "4.4.3"
    assert "timed out" in str(caught.value)
    assert ("example.test.", "MX") in dns.queries


async def test_next_name_server_is_asked_when_the_first_fails() -> None:
    records = {"example.test": [("A", "127.0.0.4")]}
    with DnsServer(records) as broken, DnsServer(records) as working:
        broken.servfail("example.test")
        lookup = Resolver([broken.address, working.address], timeout=2.0)
        hosts = await lookup.mail_hosts("example.test")
    assert hosts == [MailHost("example.test", 0, ("127.0.0.4",))]
    assert ("example.test.", "MX") in broken.queries


# --- names -------------------------------------------------------------------------


async def test_utf8_domain_is_looked_up_as_idna_and_reported_lower_case() -> None:
    records = {
        "xn--bcher-kva.test": [("MX", "10 MX.xn--bcher-kva.test.")],
        "mx.xn--bcher-kva.test": [("A", "127.0.0.6")],
    }
    with DnsServer(records) as dns:
        hosts = await resolver(dns).mail_hosts("Bücher.TEST")
    assert hosts == [MailHost("mx.xn--bcher-kva.test", 10, ("127.0.0.6",))]
    assert dns.queries[0] == ("xn--bcher-kva.test.", "MX")


@pytest.mark.parametrize("domain", ["a..test", "x" * 64 + ".test", "", "."])
async def test_malformed_domain_is_permanent_without_asking(domain: str) -> None:
    with DnsServer() as dns, pytest.raises(DnsPermanentError) as caught:
        await resolver(dns).mail_hosts(domain)
    assert caught.value.status == "5.1.2"
    assert dns.queries == []


def test_name_servers_must_be_addresses_and_timeout_positive() -> None:
    with pytest.raises(ValueError, match="IP address"):
        Resolver([("localhost", 53)])
    with pytest.raises(ValueError, match="port"):
        Resolver([("127.0.0.1", 0)])
    with pytest.raises(ValueError, match="timeout"):
        Resolver([("127.0.0.1", 53)], timeout=0)


async def test_answers_are_cached_for_their_ttl() -> None:
    records = {
        "cached.test": [("MX", "10 mx.cached.test.")],
        "mx.cached.test": [("A", "127.0.0.7")],
    }
    with DnsServer(records) as dns:
        res = resolver(dns)
        first = await res.mail_hosts("cached.test")
        second = await res.mail_hosts("cached.test")
    assert first == second == [MailHost("mx.cached.test", 10, ("127.0.0.7",))]
    # A queue of mail for one domain costs one MX and one address lookup, not one per message.
    assert dns.queries.count(("cached.test.", "MX")) == 1
    assert dns.queries.count(("mx.cached.test.", "A")) == 1
