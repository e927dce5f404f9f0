"""SPF from records on the loopback DNS server, DMARC verdicts, Authentication-Results."""

from __future__ import annotations

import time

import pytest
import trio

from trio_mta.auth import dmarc
from trio_mta.auth.dkim_verify import DkimResult
from trio_mta.auth.dmarc import DmarcPolicy, evaluate, org_domain, parse_record
from trio_mta.auth.results import authentication_results, authserv_id, strip_ours
from trio_mta.auth.spf import SpfResult, check_spf
from trio_mta.dns import Resolver

from .authhelpers import unique_domain
from .dnsserver import DnsServer

CLIENT = "192.0.2.10"


@pytest.fixture
def resolver(dns_server: DnsServer) -> Resolver:
    return Resolver([dns_server.address], timeout=1.0)


async def spf_of(resolver: Resolver, domain: str, ip: str = CLIENT) -> str:
    with trio.fail_after(15):
        result = await check_spf(resolver, ip, f"user@{domain}", "helo.test", timeout=8)
    return result.result


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("v=spf1 ip4:192.0.2.0/24 -all", "pass"),
        ("v=spf1 ip4:198.51.100.0/24 -all", "fail"),
        ("v=spf1 ip4:198.51.100.0/24 ~all", "softfail"),
        ("v=spf1 ?all", "neutral"),
        ("v=spf1 ip4:192.0.2.300 -all", "permerror"),
        ("v=spf1 frobnicate -all", "permerror"),
    ],
)
async def test_spf_results_from_a_single_record(
    resolver: Resolver, dns_server: DnsServer, record: str, expected: str
) -> None:
    domain = unique_domain("spf")
    dns_server.add(domain + ".", "TXT", f'"{record}"')
    assert await spf_of(resolver, domain) == expected


async def test_spf_none_without_a_record(resolver: Resolver, dns_server: DnsServer) -> None:
    domain = unique_domain("nospf")
    dns_server.add(domain + ".", "TXT", '"some other text"')
    assert await spf_of(resolver, domain) == "none"
    assert await spf_of(resolver, unique_domain("nxdomain")) == "none"


async def test_spf_dns_failure_is_temperror_never_a_hang(
    resolver: Resolver, dns_server: DnsServer
) -> None:
    failing, silent = unique_domain("servfail"), unique_domain("silent")
    dns_server.servfail(failing + ".")
    dns_server.blackhole(silent + ".")
    assert await spf_of(resolver, failing) == "temperror"
    assert await spf_of(resolver, silent) == "temperror"
    # Silence deep in an include chain, too.
    top = unique_domain("inc")
    dns_server.add(top + ".", "TXT", f'"v=spf1 include:{silent} -all"')
    assert await spf_of(resolver, top) == "temperror"


async def test_spf_include_chain_and_a_mx_mechanisms(
    resolver: Resolver, dns_server: DnsServer
) -> None:
    top, middle, leaf = unique_domain("top"), unique_domain("mid"), unique_domain("leaf")
    dns_server.add(top + ".", "TXT", f'"v=spf1 include:{middle} -all"')
    dns_server.add(middle + ".", "TXT", f'"v=spf1 mx include:{leaf} -all"')
    dns_server.add(middle + ".", "MX", f"10 mx.{middle}.")
    dns_server.add(f"mx.{middle}.", "A", "203.0.113.25")
    dns_server.add(leaf + ".", "TXT", f'"v=spf1 a:host.{leaf} -all"')
    dns_server.add(f"host.{leaf}.", "A", "198.51.100.7")
    assert await spf_of(resolver, top, "203.0.113.25") == "pass"  # via middle's MX
    assert await spf_of(resolver, top, "198.51.100.7") == "pass"  # via leaf's a:
    assert await spf_of(resolver, top, "192.0.2.99") == "fail"
    # An include whose target has no SPF record is a permerror (RFC 7208 §5.2).
    broken = unique_domain("broken")
    dns_server.add(broken + ".", "TXT", f'"v=spf1 include:{unique_domain("gone")} -all"')
    assert await spf_of(resolver, broken) == "permerror"


async def test_spf_stops_at_ten_dns_mechanisms(resolver: Resolver, dns_server: DnsServer) -> None:
    """RFC 7208 §4.6.4: the 11th DNS-querying term is a permerror, 10 are fine."""

    def chain(terms: int) -> str:
        domain = unique_domain("lim")
        names = [f"h{i}.{domain}" for i in range(terms)]
        for name in names:
            dns_server.add(name + ".", "A", "198.51.100.1")
        record = "v=spf1 " + " ".join(f"a:{n}" for n in names) + " ip4:192.0.2.0/24 -all"
        strings = " ".join(f'"{record[i : i + 200]}"' for i in range(0, len(record), 200))
        dns_server.add(domain + ".", "TXT", strings)  # DNS joins them (RFC 7208 §3.3)
        return domain

    assert await spf_of(resolver, chain(10)) == "pass"
    assert await spf_of(resolver, chain(11)) == "permerror"


async def test_spf_void_lookup_limit(resolver: Resolver, dns_server: DnsServer) -> None:
    """RFC 7208 §4.6.4: more than two lookups that find nothing is a permerror."""
    domain = unique_domain("void")
    gone = [f"gone{i}.{domain}" for i in range(3)]
    dns_server.add(f"keep.{domain}.", "A", "198.51.100.1")  # makes domain exist
    dns_server.add(
        domain + ".",
        "TXT",
        '"v=spf1 ' + " ".join(f"a:{g}" for g in gone) + ' ip4:192.0.2.0/24 -all"',
    )
    assert await spf_of(resolver, domain) == "permerror"
    two = unique_domain("void2")
    dns_server.add(
        two + ".",
        "TXT",
        '"v=spf1 ' + " ".join(f"a:{g}" for g in gone[:2]) + ' ip4:192.0.2.0/24 -all"',
    )
    assert await spf_of(resolver, two) == "pass"


async def test_spf_explanation_lookups_are_not_void_lookups(
    resolver: Resolver, dns_server: DnsServer
) -> None:
    """RFC 7208 §4.6.4 counts void lookups of terms; an explanation (§6.2) is no term.

    pyspf expands ``exp=`` before the mechanisms and counted what ``%{p}`` found
    nothing for: three PTR names without addresses used up the void limit, and the
    record's own two voids then made a permerror of its pass (hypothesis found it).
    """
    domain = unique_domain("voidexp")
    client = "192.0.2.77"
    gone = [f"gone{i}.{domain}" for i in range(3)]
    dns_server.add(f"keep.{domain}.", "A", "198.51.100.1")
    for name in gone:
        dns_server.add("77.2.0.192.in-addr.arpa.", "PTR", name + ".")
    dns_server.add(f"why.{domain}.", "TXT", '"%{i} via %{p} is not allowed"')
    voids = " ".join(f"a:{g}" for g in gone[:2])
    dns_server.add(domain + ".", "TXT", f'"v=spf1 {voids} ip4:192.0.2.64/26 -all exp=why.{domain}"')
    assert await spf_of(resolver, domain, client) == "pass"
    assert await spf_of(resolver, domain, "192.0.2.10") == "fail"


async def test_spf_checks_the_helo_name_for_the_null_sender(
    resolver: Resolver, dns_server: DnsServer
) -> None:
    helo = unique_domain("helo")
    dns_server.add(helo + ".", "TXT", '"v=spf1 ip4:192.0.2.10 -all"')
    result = await check_spf(resolver, CLIENT, "", helo, timeout=5)
    assert (result.result, result.identity, result.domain) == ("pass", "helo", helo)


async def test_spf_checks_the_domain_after_the_last_at_of_a_quoted_local_part(
    resolver: Resolver, dns_server: DnsServer
) -> None:
    # Found by fuzz/fuzz_spf.py: pyspf split at the first "@", so a forger's
    # "x@y"@victim was checked at y"@victim (none) instead of victim (fail).
    domain = unique_domain("quoted")
    dns_server.add(domain + ".", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"')
    with trio.fail_after(15):
        forged = await check_spf(resolver, CLIENT, f'"x@y"@{domain}', "helo.test", timeout=8)
        allowed = await check_spf(resolver, "198.51.100.7", f'"x@y"@{domain}', "h.test", timeout=8)
    assert (forged.result, forged.domain) == ("fail", domain)
    assert allowed.result == "pass"


async def test_spf_of_a_link_local_client_ignores_its_zone_index(
    resolver: Resolver, dns_server: DnsServer
) -> None:
    # Found by fuzz/fuzz_spf.py: "fe80::1%eth0", as getpeername gives a link-local
    # peer, made pyspf raise, which check_spf turned into temperror.
    domain = unique_domain("scoped")
    dns_server.add(domain + ".", "TXT", '"v=spf1 ip6:fe80::/64 -all"')
    with trio.fail_after(15):
        near = await check_spf(resolver, "fe80::1%eth0", f"a@{domain}", "h.test", timeout=8)
        far = await check_spf(resolver, "2001:db8::1%2", f"a@{domain}", "h.test", timeout=8)
    assert (near.result, far.result) == ("pass", "fail")


async def test_spf_of_what_is_no_domain_name_is_none_without_a_lookup() -> None:
    # Found by fuzz/fuzz_spf.py: an address-literal or one-label HELO (null sender)
    # was looked up in DNS as a name; RFC 7208 §4.3 says "none", immediately.
    with DnsServer() as server:
        resolver = Resolver([server.address], timeout=1.0)
        with trio.fail_after(15):
            for helo in ("[192.0.2.10]", "[IPv6:2001:db8::1]", "localhost", "a..example"):
                result = await check_spf(resolver, CLIENT, "", helo, timeout=8)
                assert (result.result, result.identity) == ("none", "helo"), helo
            result = await check_spf(resolver, CLIENT, "postmaster@localhost", "h.test", timeout=8)
            assert result.result == "none"
            assert server.queries == []
            await check_spf(resolver, CLIENT, "", "helo.test", timeout=8)  # the control
        assert server.queries


# -- DMARC ---------------------------------------------------------------------------------


def spf(result: str, domain: str) -> SpfResult:
    return SpfResult(result, "mailfrom", domain)


def dkim_pass(domain: str) -> DkimResult:
    return DkimResult("pass", domain, "s1", "ed25519-sha256", "")


POLICY = DmarcPolicy("example.org", p="reject", sp="quarantine")


def test_dmarc_passes_by_aligned_spf_or_dkim_and_fails_otherwise() -> None:
    assert evaluate("example.org", POLICY, spf("pass", "bounces.example.org"), []).result == "pass"
    assert evaluate("example.org", POLICY, None, [dkim_pass("mail.example.org")]).result == "pass"
    # Unaligned passes do not count; neither do fails.
    failed = evaluate("example.org", POLICY, spf("pass", "other.net"), [dkim_pass("other.net")])
    assert (failed.result, failed.policy, failed.disposition) == ("fail", "reject", "reject")
    assert evaluate("example.org", POLICY, spf("fail", "example.org"), []).result == "fail"
    strict = DmarcPolicy("example.org", "reject", "reject", adkim="s", aspf="s")
    assert (
        evaluate(
            "example.org",
            strict,
            spf("pass", "bounces.example.org"),
            [dkim_pass("mail.example.org")],
        ).result
        == "fail"
    )
    assert evaluate("example.org", strict, None, [dkim_pass("example.org")]).result == "pass"
    assert evaluate("example.org", None, None, []).result == "none"


def test_dmarc_subdomain_policy_and_pct() -> None:
    # Policy found at the organizational domain applies sp= to a subdomain.
    sub = evaluate("news.example.org", POLICY, None, [])
    assert (sub.result, sub.policy, sub.disposition) == ("fail", "quarantine", "quarantine")
    sampled = DmarcPolicy("example.org", "reject", "reject", pct=25)
    assert evaluate("example.org", sampled, None, [], sample=0.10).disposition == "reject"
    assert evaluate("example.org", sampled, None, [], sample=0.30).disposition == "quarantine"


def test_dmarc_record_parsing() -> None:
    parsed = parse_record("v=DMARC1; p=reject; sp=none; pct=50; adkim=s", "example.org")
    assert parsed == DmarcPolicy("example.org", "reject", "none", 50, "s", "r")
    assert parse_record("v=DMARC1; p=bogus", "example.org") is None
    assert parse_record("v=DMARC1; p=bogus; rua=mailto:x@example.org", "x").p == "none"  # type: ignore[union-attr]
    assert parse_record("v=spf1 -all", "example.org") is None
    assert parse_record("v=DMARC1; p=quarantine", "example.org").sp == "quarantine"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "text, expected",
    [
        # Found by fuzz_dmarc against RFC 7489. §6.6.3 step 6: an invalid sp= is as bad as
        # an invalid p= (no DMARC, or p=none with a valid rua), not "sp defaults to p".
        ("v=DMARC1; p=reject; sp=bogus", None),
        ("v=DMARC1; p=reject; sp=bogus; rua=mailto:d@example.org", ("none", "none", 100)),
        ("v=DMARC1; p=bogus; sp=reject; rua=mailto:d@example.org!10m", ("none", "none", 100)),
        # ... and the rua must be a URI, as the docstring always said.
        ("v=DMARC1; p=bogus; rua=", None),
        ("v=DMARC1; p=bogus; rua=not a uri, either", None),
        # §6.3: a pct that is not 0..100 in digits is the default, not clamped: pct=-5
        # meant "apply the policy to no failing mail".
        ("v=DMARC1; p=reject; pct=-5", ("reject", "reject", 100)),
        ("v=DMARC1; p=reject; pct=+5", ("reject", "reject", 100)),
        ("v=DMARC1; p=reject; pct=\u0665", ("reject", "reject", 100)),
        ("v=DMARC1; p=reject; pct=050", ("reject", "reject", 50)),
        # §6.3: v=DMARC1 must match precisely; spaces inside the value are not that.
        ("v=DM ARC1; p=reject", None),
        ("v = DMARC1 ; p = reject", ("reject", "reject", 100)),
    ],
)
def test_dmarc_record_errors_follow_rfc_7489(
    text: str, expected: tuple[str, str, int] | None
) -> None:
    parsed = parse_record(text, "example.org")
    assert (None if parsed is None else (parsed.p, parsed.sp, parsed.pct)) == expected


def test_organizational_domain_comes_from_the_public_suffix_list() -> None:
    assert org_domain("a.b.example.co.uk") == "example.co.uk"
    assert org_domain("mail.example.org") == "example.org"
    assert org_domain("Example.ORG.") == "example.org"


async def test_dmarc_policy_discovery_falls_back_to_the_organizational_domain(
    resolver: Resolver, dns_server: DnsServer
) -> None:
    org = unique_domain("org")
    dns_server.add(f"_dmarc.{org}.", "TXT", '"v=DMARC1; p=reject; sp=none"')
    found = await dmarc.fetch_policy(resolver, f"a.b.{org}")
    # .test is not in the PSL, so the org domain is the last two labels.
    assert found is not None and (found.domain, found.sp) == (org, "none")
    dns_server.servfail(f"_dmarc.{unique_domain('dm')}.")
    flaky = unique_domain("dmf")
    dns_server.servfail(f"_dmarc.{flaky}.")
    assert (await dmarc.check_dmarc(resolver, flaky, None, [])).result == "temperror"


# -- Authentication-Results -------------------------------------------------------------------


def test_authentication_results_header_shape() -> None:
    header = authentication_results(
        "mx.example.test",
        spf=spf("pass", "example.org"),
        dkim=[
            dkim_pass("example.org"),
            DkimResult("fail", "x.net", "k", "rsa-sha256", "", "body hash mismatch; really"),
        ],
        dmarc=dmarc.DmarcResult("pass", "example.org", "reject", "none"),
        sender="alice@example.org",
    )
    text = header.decode()
    assert text.endswith("\r\n") and text.count("\r\n") == 5
    unfolded = text.replace("\r\n\t", " ")
    assert unfolded.startswith(
        "Authentication-Results: mx.example.test; spf=pass "
        "smtp.mailfrom=alice@example.org; dkim=pass"
    )
    assert 'dkim=fail reason="body hash mismatch really"' in unfolded
    assert "dmarc=pass (p=reject dis=none) header.from=example.org" in unfolded
    assert all(len(line) <= 100 for line in text.split("\r\n"))
    assert (
        authentication_results("mx.example.test", spf=None, dkim=None, dmarc=None)
        == b"Authentication-Results: mx.example.test; none\r\n"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b" mx.example.test; spf=pass", "mx.example.test"),
        (b" MX.Example.Test 1; none", "mx.example.test"),
        (b' (forged) "mx.example.test"; dkim=pass', "mx.example.test"),
        (b"\r\n\t(a (nested) comment) mx.example.test;spf=pass", "mx.example.test"),
        (b" other.example; spf=pass", "other.example"),
        (b"  ", None),
    ],
)
def test_authserv_id(value: bytes, expected: str | None) -> None:
    assert authserv_id(value) == expected


def test_strip_removes_only_our_authentication_results() -> None:
    message = (
        b"Received: from a\r\n\tby b\r\n"
        b"Authentication-Results: mx.example.test; dkim=pass\r\n\theader.d=evil.test\r\n"
        b"authentication-results:MX.EXAMPLE.TEST;spf=pass\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n"
        b"Subject: Authentication-Results: mx.example.test; x\r\n"
        b"\r\n"
        b"Authentication-Results: mx.example.test; body line stays\r\n"
    )
    stripped = strip_ours(message, "mx.example.test")
    assert stripped == (
        b"Received: from a\r\n\tby b\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n"
        b"Subject: Authentication-Results: mx.example.test; x\r\n"
        b"\r\n"
        b"Authentication-Results: mx.example.test; body line stays\r\n"
    )
    clean = b"Subject: x\r\n\r\nbody\r\n"
    assert strip_ours(clean, "mx.example.test") is clean


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Found by fuzz/fuzz_authres.py: a quoted-pair is the character it quotes.
        (b' "mx.exa\\mple.test"; dkim=pass', "mx.example.test"),
        (b' "mx.example.test\\"; x', None),  # never closed: not our id
        (b'\r\n "mx.example\r\n .test"; x', "mx.example .test"),  # unfolded, not ours
    ],
)
def test_authserv_id_quoted_pairs_and_folding(value: bytes, expected: str | None) -> None:
    got = authserv_id(value)
    assert got == expected if expected is not None else got != "mx.example.test"


def test_strip_leaves_a_message_without_header_fields_alone() -> None:
    # Found by fuzz/fuzz_authres.py: a message that starts with the empty line is all
    # body (RFC 5322 §2.1), and a line in it that looks like our field stays.
    message = b"\r\nAuthentication-Results: mx.example.test; none\r\n\r\nbody\r\n"
    assert strip_ours(message, "mx.example.test") == message


def test_strip_keeps_the_bytes_of_a_message_without_body() -> None:
    # Found by fuzz/fuzz_authres.py: the last field, without CRLF (BDAT can end so),
    # used to get a CRLF added.
    message = b"Authentication-Results: mx.example.test; none\r\nSubject: no end"
    assert strip_ours(message, "mx.example.test") == b"Subject: no end"
    other = b"Authentication-Results: other.example; none\r\nSubject: no end"
    assert strip_ours(other, "mx.example.test") == other


@pytest.mark.parametrize(
    ("helo", "sender", "dkim_selector", "from_domain"),
    [
        ("a@b(", "", "k", "example.org"),  # found by fuzz/fuzz_authres.py
        ("client.example", "", "x@y header.d=paypal.example", "example.org"),
        ("client.example", "", "k", "ex\x04ample\x00.org"),
    ],
)
def test_peer_values_cannot_hide_or_add_results(
    helo: str, sender: str, dkim_selector: str, from_domain: str
) -> None:
    """HELO, d=/s= and the From: domain come from the peer: they stay one pvalue each."""
    import authres
    import authres.dmarc

    header = authentication_results(
        "mx.example.test",
        spf=SpfResult("none", "helo", helo),
        dkim=[DkimResult("fail", "evil.example", dkim_selector, "rsa-sha256", "", "bad")],
        dmarc=dmarc.DmarcResult("fail", from_domain, "reject", "reject"),
        sender=sender,
        helo=helo,
    )
    value = header.decode().partition(":")[2].replace("\r\n", "")
    parsed = authres.FeatureContext(authres.dmarc).parse_value(value)
    assert parsed.authserv_id == "mx.example.test"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "none"),
        ("dkim", "fail"),
        ("dmarc", "fail"),
    ]
    assert not any(ord(c) < 0x20 and c != "\t" for c in value)
    spf_result, dkim_result, dmarc_result = parsed.results
    assert spf_result.smtp_helo == helo
    assert (dkim_result.header_d, dkim_result.header_s) == ("evil.example", dkim_selector)
    assert dmarc_result.header_from == from_domain.replace("\x04", "").replace("\x00", "")


def test_a_reason_naming_the_signers_selector_stays_one_value() -> None:
    # Found by fuzz/fuzz_authres.py: "no key at <s=>._domainkey.<d=>" with an "@"
    # in s= went out bare, and its "(" swallowed the DMARC result after it.
    import authres
    import authres.dmarc

    header = authentication_results(
        "mx.example.test",
        spf=None,
        dkim=[DkimResult("permerror", "evil.example", "k", "", "", "no key at x@y (._domainkey")],
        dmarc=dmarc.DmarcResult("fail", "example.org", "reject", "reject"),
    )
    value = header.decode().partition(":")[2].replace("\r\n", "")
    parsed = authres.FeatureContext(authres.dmarc).parse_value(value)
    assert [(r.method, r.result) for r in parsed.results] == [
        ("dkim", "permerror"),
        ("dmarc", "fail"),
    ]
    assert parsed.results[0].reason == "no key at x@y (._domainkey"


def test_addresses_are_still_rendered_bare() -> None:
    header = authentication_results(
        "mx.example.test",
        spf=SpfResult("pass", "mailfrom", "example.org"),
        dkim=None,
        dmarc=None,
        sender='"a b"@example.org',
    )
    assert b'smtp.mailfrom="a b"@example.org' in header


async def test_spf_lookups_never_stall_the_event_loop(
    resolver: Resolver, dns_server: DnsServer
) -> None:
    """A check waiting on a silent name server leaves the loop free for other sessions."""
    silent = unique_domain("stall")
    dns_server.blackhole(silent + ".")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.05)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        start = trio.current_time()
        assert await spf_of(resolver, silent) == "temperror"
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    # The resolver's timeout is 1 s: the ticker ran all along (a blocking lookup
    # would have frozen it for that second).
    assert elapsed >= 0.9
    assert ticks >= elapsed / 0.05 * 0.5


async def test_records_are_served_from_cache_within_their_ttl(
    resolver: Resolver, dns_server: DnsServer
) -> None:
    domain = unique_domain("cache")
    dns_server.add(domain + ".", "TXT", '"v=spf1 -all"')
    assert resolver.peek(domain, "TXT") is None
    first = await resolver.records(domain, "TXT")
    asked = dns_server.queries.count((domain + ".", "TXT"))
    assert asked == 1
    again = await resolver.records(domain.upper(), "TXT")
    assert again == first and resolver.peek(domain, "TXT") == first
    assert dns_server.queries.count((domain + ".", "TXT")) == 1
    # Two checks of one sender: the second asks DNS nothing.
    await spf_of(resolver, domain)
    await spf_of(resolver, domain)
    assert dns_server.queries.count((domain + ".", "TXT")) == 1


async def test_spf_results_are_reused_only_while_every_answer_is_cached(
    resolver: Resolver, dns_server: DnsServer
) -> None:
    domain, missing = unique_domain("memo"), unique_domain("memomiss")
    dns_server.add(domain + ".", "TXT", '"v=spf1 ip4:192.0.2.0/24 -all"')
    dns_server.add(missing + ".", "TXT", f'"v=spf1 a:nothing.{missing} -all"')
    memo: dict = {}  # type: ignore[type-arg]
    first = await check_spf(resolver, CLIENT, f"a@{domain}", "h.test", timeout=5, memo=memo)
    assert first.result == "pass" and len(memo) == 1
    [(expires, kept)] = memo.values()
    assert kept == first and time.time() < expires <= time.time() + 60  # the TTL
    # The same client, sender and HELO: the kept verdict, nothing asked of DNS.
    before = len(dns_server.queries)
    again = await check_spf(resolver, CLIENT, f"a@{domain}", "h.test", timeout=5, memo=memo)
    assert again == first and len(dns_server.queries) == before
    # Another client address is evaluated on its own.
    other = await check_spf(resolver, "198.51.100.1", f"a@{domain}", "h.test", timeout=5, memo=memo)
    assert other.result == "fail" and len(memo) == 2
    # A verdict that rested on a lookup finding nothing is not kept.
    void = await check_spf(resolver, CLIENT, f"a@{missing}", "h.test", timeout=5, memo=memo)
    assert void.result == "fail" and len(memo) == 2
