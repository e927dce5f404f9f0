"""DANE (RFC 7672, SPEC §10) end to end: the loopback DNS server claims the AD bit (as a
validating resolver on a trusted path would) and serves TLSA records computed from the
MX's real certificate; aiosmtpd plays the MX on 127.0.0.2. No CA is configured: DANE
needs none."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.dnsserver import DnsServer
from tests.policy_peers import (
    MailWatcher,
    PolicyServer,
    ca_cert,
    leaf_of,
    policy_text,
    start_policy_server,
    tlsa,
)
from tests.test_client import FAST, MX1, aiosmtpd_peer, free_port, server_tls
from tests.test_remote import attempts, item
from trio_mta.config import RelayConfig
from trio_mta.delivery.agent import Outcome
from trio_mta.delivery.remote import RemoteAgent
from trio_mta.dns import Resolver

HOSTNAME = "relay.local.test"
TLSA_NAME = "_{port}._tcp.mx1.remote.test"


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")


def zone(port: int, *tlsa_records: str) -> dict[str, list[tuple[str, str]]]:
    records: dict[str, list[tuple[str, str]]] = {
        "remote.test": [("MX", "10 mx1.remote.test.")],
        "mx1.remote.test": [("A", "127.0.0.2")],
    }
    if tlsa_records:
        records[TLSA_NAME.format(port=port)] = [("TLSA", r) for r in tlsa_records]
    return records


async def deliver(dns: DnsServer, port: int, **relay: Any) -> list[Outcome]:
    agent = RemoteAgent(
        RelayConfig(port=port, **relay),
        Resolver([dns.address], timeout=2.0),
        hostname=HOSTNAME,
        timeouts=FAST,
        policy_fetch_timeout=2.0,
    )
    return list(await agent.deliver([item("bob@remote.test")]))


@pytest.mark.parametrize("selector", [1, 0])
async def test_dane_ee_match_delivers_without_any_ca(
    selector: int, caplog: pytest.LogCaptureFixture
) -> None:
    """``3 1 1`` and ``3 0 1``: a self-made CA nobody trusts; the TLSA record is the proof."""
    port, handler = free_port(), MailWatcher()
    cert = trustme.CA().issue_cert("not-the-mx-name.test")  # DANE-EE skips names (§3.1.1)
    with (
        DnsServer(zone(port, tlsa(3, selector, 1, leaf_of(cert))), authenticated=True) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=_ctx(cert)),
    ):
        outcomes = await deliver(dns, port)
    assert [o.kind for o in outcomes] == ["delivered"]
    assert [m.tls for m in handler.messages] == [True]
    (logged,) = attempts(caplog)
    assert logged["tls_policy"] == "dane"


async def test_dane_mismatch_defers_and_sends_no_mail(caplog: pytest.LogCaptureFixture) -> None:
    """An attacker with any certificate (even one a CA signed for the MX name) loses."""
    port, handler, ca = free_port(), MailWatcher(), trustme.CA()
    published = ca.issue_cert(MX1)
    with (
        DnsServer(zone(port, tlsa(3, 1, 1, leaf_of(published))), authenticated=True) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(ca, MX1)),
    ):
        (outcome,) = await deliver(dns, port)
    assert (outcome.kind, outcome.status, outcome.stage) == ("deferred", "4.7.5", "tls")
    assert outcome.text == (
        f"dane: certificate matches none of 1 usable TLSA records (leaf "
        f"(no chain sent) checked) at {TLSA_NAME.format(port=port)}"
    )
    assert handler.mails == []
    (logged,) = attempts(caplog)
    assert (logged["tls_policy"], logged["outcome"]) == ("dane", "unreachable")


async def test_dane_makes_starttls_mandatory() -> None:
    """The MX (or an attacker in front of it) hides STARTTLS: no plain-text fallback."""
    port, handler = free_port(), MailWatcher()
    cert = trustme.CA().issue_cert(MX1)
    with (
        DnsServer(zone(port, tlsa(3, 1, 1, leaf_of(cert))), authenticated=True) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port),
    ):
        (outcome,) = await deliver(dns, port)
    assert (outcome.kind, outcome.status) == ("deferred", "4.7.10")
    assert outcome.text == "dane: STARTTLS not offered"
    assert handler.mails == []


async def test_dane_ta_with_a_matching_issuer_delivers() -> None:
    """``2 0 1`` names the intermediate that issued the MX certificate (sent in its chain)."""
    port, handler = free_port(), MailWatcher()
    issuer = trustme.CA().create_child_ca()
    with (
        DnsServer(zone(port, tlsa(2, 0, 1, ca_cert(issuer))), authenticated=True) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(issuer, MX1)),
    ):
        outcomes = await deliver(dns, port)
    assert [o.kind for o in outcomes] == ["delivered"]


async def test_dane_ta_checks_the_mx_name() -> None:
    """Unlike DANE-EE, a DANE-TA match still needs the certificate to name the MX host."""
    port, handler = free_port(), MailWatcher()
    issuer = trustme.CA().create_child_ca()
    with (
        DnsServer(zone(port, tlsa(2, 1, 1, ca_cert(issuer))), authenticated=True) as dns,
        aiosmtpd_peer(
            handler, "127.0.0.2", port, tls_context=server_tls(issuer, "mx.attacker.test")
        ),
    ):
        (outcome,) = await deliver(dns, port)
    assert outcome.kind == "deferred"
    assert "DANE-TA trust anchor matched, but the chain does not verify" in outcome.text
    assert handler.mails == []


async def test_without_ad_tlsa_records_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """Unauthenticated answers prove nothing: plain opportunistic TLS, even on a mismatch."""
    port, handler = free_port(), MailWatcher()
    wrong = trustme.CA().issue_cert(MX1)
    with (
        DnsServer(zone(port, tlsa(3, 1, 1, leaf_of(wrong)))) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(trustme.CA(), MX1)),
    ):
        outcomes = await deliver(dns, port)
    assert [o.kind for o in outcomes] == ["delivered"]
    assert attempts(caplog)[0]["tls_policy"] == "opportunistic"
    assert (f"_{port}._tcp.mx1.remote.test.", "TLSA") not in dns.queries


async def test_an_unauthenticated_mx_answer_disables_dane() -> None:
    """RFC 7672 §2.2.1: TLSA records of an MX host named by an insecure MX answer don't count."""
    port, handler = free_port(), MailWatcher()
    wrong = trustme.CA().issue_cert(MX1)
    with DnsServer(zone(port, tlsa(3, 1, 1, leaf_of(wrong))), authenticated=True) as dns:
        dns.unauthenticated("remote.test")
        with aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(trustme.CA(), MX1)):
            outcomes = await deliver(dns, port)
    assert [o.kind for o in outcomes] == ["delivered"]


async def test_only_unusable_tlsa_records_mean_mandatory_unauthenticated_tls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PKIX usages are ignored for SMTP (RFC 7672 §3.1.3); secure-but-unusable records still
    forbid clear text (RFC 7672 §2.2)."""
    port, ca = free_port(), trustme.CA()
    cert = ca.issue_cert(MX1)
    records = zone(
        port, tlsa(1, 1, 1, leaf_of(cert)), tlsa(0, 0, 1, ca_cert(ca)), "3 1 9 00ff"
    )  # an unknown matching type: unusable too
    with DnsServer(records, authenticated=True) as dns:
        encrypted, plain = MailWatcher(), MailWatcher()
        with aiosmtpd_peer(
            encrypted, "127.0.0.2", port, tls_context=server_tls(trustme.CA(), "x.test")
        ):
            delivered = await deliver(dns, port)
        with aiosmtpd_peer(plain, "127.0.0.2", port):
            deferred = await deliver(dns, port)
    assert [o.kind for o in delivered] == ["delivered"]
    assert [m.tls for m in encrypted.messages] == [True]
    assert attempts(caplog)[0]["tls_policy"] == "dane"
    assert [o.kind for o in deferred] == ["deferred"] and plain.mails == []


async def test_a_failed_tlsa_lookup_skips_an_authenticated_host() -> None:
    """RFC 7672 §2.2: SERVFAIL for TLSA is not "no records"; the host is not used."""
    port, handler = free_port(), MailWatcher()
    with DnsServer(zone(port), authenticated=True) as dns:
        dns.servfail(TLSA_NAME.format(port=port))
        with aiosmtpd_peer(handler, "127.0.0.2", port):
            (outcome,) = await deliver(dns, port)
    assert (outcome.kind, outcome.status) == ("deferred", "4.7.5")
    assert outcome.text.startswith("dane: TLSA lookup for authenticated MX mx1.remote.test failed")
    assert handler.ehlos == []


async def test_dane_wins_over_mta_sts(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 8461 §2: with usable TLSA records, an MTA-STS policy that would refuse the host
    (its mx: does not list it) does not apply."""
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    policy = await start_policy_server(
        nursery, ca, PolicyServer(policy_text("enforce", "mx7.remote.test"))
    )
    port, handler = free_port(), MailWatcher()
    cert = trustme.CA().issue_cert(MX1)
    records = zone(port, tlsa(3, 1, 1, leaf_of(cert)))
    records["_mta-sts.remote.test"] = [("TXT", '"v=STSv1; id=1"')]
    records["mta-sts.remote.test"] = [("A", "127.0.0.1")]
    with (
        DnsServer(records, authenticated=True) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=_ctx(cert)),
    ):
        outcomes = await deliver(dns, port, ca_file=bundle, mta_sts_port=policy.port)
    assert [o.kind for o in outcomes] == ["delivered"]
    assert attempts(caplog)[0]["tls_policy"] == "dane"


async def test_dane_off_ignores_tlsa_records() -> None:
    port, handler = free_port(), MailWatcher()
    wrong = trustme.CA().issue_cert(MX1)
    with (
        DnsServer(zone(port, tlsa(3, 1, 1, leaf_of(wrong))), authenticated=True) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(trustme.CA(), MX1)),
    ):
        outcomes = await deliver(dns, port, dane=False)
    assert [o.kind for o in outcomes] == ["delivered"]


def _ctx(cert: trustme.LeafCert) -> Any:
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


@pytest.mark.parametrize(
    "server, trusted",
    [
        ("127.0.0.53", True),
        ("Do53:127.0.0.1@53", True),
        ("::1", True),
        ("192.0.2.53", False),
        ("Do53:2001:db8::53@53", False),
    ],
)
def test_a_system_resolver_is_trusted_for_ad_only_on_loopback(server: str, trusted: bool) -> None:
    """AD from a resolver across the network could be forged on the way (RFC 4035 §4.9.3)."""
    from trio_mta.dns import _loopback

    assert _loopback(server) is trusted


async def test_configured_nameservers_are_trusted_for_ad() -> None:
    with DnsServer(zone(25), authenticated=True) as dns:
        resolver = Resolver([dns.address], timeout=2.0)
        assert resolver.trusts_ad
        (mx,) = await resolver.mail_hosts("remote.test")
        assert mx.authenticated
        dns.unauthenticated("mx1.remote.test")
        (mx,) = await Resolver([dns.address], timeout=2.0).mail_hosts("remote.test")
        assert not mx.authenticated  # the address answer lacked AD (RFC 7672 §2.2.2)
