"""MTA-STS (RFC 8461, SPEC §10) end to end: the loopback DNS server publishes the TXT
record and the policy host, a trio HTTPS server (trustme) serves the policy, aiosmtpd
plays the MX on 127.0.0.2. See tests/policy_peers.py for why the policy port is a
test-only setting."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.dnsserver import DnsServer
from tests.policy_peers import (
    POLICY_HOST,
    MailWatcher,
    PolicyServer,
    policy_text,
    start_policy_server,
)
from tests.test_client import FAST, MX1, aiosmtpd_peer, free_port, server_tls
from tests.test_remote import attempts, item
from trio_mta.config import RelayConfig
from trio_mta.delivery.remote import RemoteAgent
from trio_mta.dns import Resolver
from trio_mta.metrics import Metrics
from trio_mta.tls import client_context
from trio_mta.tlspolicy.fetch import MAX_POLICY_SIZE, FetchError, fetch_policy

HOSTNAME = "relay.local.test"


def records(txt_id: str = "1") -> dict[str, list[tuple[str, str]]]:
    return {
        "remote.test": [("MX", "10 mx1.remote.test.")],
        "mx1.remote.test": [("A", "127.0.0.2")],
        "_mta-sts.remote.test": [("TXT", f'"v=STSv1; id={txt_id};"')],
        POLICY_HOST: [("A", "127.0.0.1")],
    }


@pytest.fixture
def bundle(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")


def agent(
    dns: DnsServer, port: int, bundle: Path, policy: PolicyServer, state_dir: Path, **options: Any
) -> RemoteAgent:
    relay = RelayConfig(port=port, ca_file=bundle, mta_sts_port=policy.port)
    return RemoteAgent(
        relay,
        Resolver([dns.address], timeout=2.0),
        hostname=HOSTNAME,
        timeouts=FAST,
        state_dir=state_dir,
        policy_fetch_timeout=2.0,
        **options,
    )


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [
        dict(r.trio_mta_fields)
        for r in caplog.records  # type: ignore[attr-defined]
        if r.getMessage() == name
    ]


async def test_enforce_delivers_over_verified_tls_to_a_matching_mx(
    nursery: trio.Nursery,
    ca: trustme.CA,
    bundle: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = await start_policy_server(nursery, ca, PolicyServer(policy_text("enforce", MX1)))
    port, handler, metrics = free_port(), MailWatcher(), Metrics()
    with (
        DnsServer(records()) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(ca, MX1)),
    ):
        outcomes = await agent(dns, port, bundle, policy, tmp_path, metrics=metrics).deliver(
            [item("bob@remote.test")]
        )
    assert [o.kind for o in outcomes] == ["delivered"]
    assert [m.tls for m in handler.messages] == [True]
    assert handler.ehlos == [HOSTNAME, HOSTNAME]  # before and after STARTTLS
    assert policy.requests == ["/.well-known/mta-sts.txt"]
    (logged,) = attempts(caplog)
    assert logged["tls_policy"] == "mta-sts"
    stored = json.loads((tmp_path / "mta-sts" / "remote.test.json").read_text())
    assert (stored["id"], stored["domain"]) == ("1", "remote.test")
    assert (
        'trio_mta_tls_policy_attempts_total{outcome="delivered",policy="mta-sts"} 1.0'
        in metrics.render().decode()
    )


async def test_enforce_never_connects_to_an_mx_outside_the_policy(
    nursery: trio.Nursery,
    ca: trustme.CA,
    bundle: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = await start_policy_server(
        nursery, ca, PolicyServer(policy_text("enforce", "*.elsewhere.test"))
    )
    port, handler = free_port(), MailWatcher()
    with (
        DnsServer(records()) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(ca, MX1)),
    ):
        outcomes = await agent(dns, port, bundle, policy, tmp_path).deliver(
            [item("bob@remote.test")]
        )
    (outcome,) = outcomes
    assert (outcome.kind, outcome.status, outcome.stage) == ("deferred", "4.7.5", "tls")
    assert outcome.text == (
        "mta-sts enforce: MX mx1.remote.test does not match the policy of "
        "remote.test (mx: *.elsewhere.test)"
    )
    assert outcome.remote_address is None  # never connected
    assert handler.ehlos == [] and handler.messages == []
    (logged,) = attempts(caplog)
    assert (logged["tls_policy"], logged["outcome"]) == ("mta-sts", "refused")


async def test_enforce_defers_an_mx_that_hides_starttls_and_sends_no_mail(
    nursery: trio.Nursery,
    ca: trustme.CA,
    bundle: Path,
    tmp_path: Path,
) -> None:
    """The downgrade an attacker on the path tries first: strip STARTTLS from EHLO."""
    policy = await start_policy_server(nursery, ca, PolicyServer(policy_text("enforce", MX1)))
    port, handler = free_port(), MailWatcher()
    with DnsServer(records()) as dns, aiosmtpd_peer(handler, "127.0.0.2", port):
        (outcome,) = await agent(dns, port, bundle, policy, tmp_path).deliver(
            [item("bob@remote.test")]
        )
    assert (outcome.kind, outcome.status) == ("deferred", "4.7.10")
    assert outcome.text == "mta-sts enforce: STARTTLS not offered"
    assert handler.mails == []


async def test_enforce_defers_an_mx_whose_certificate_names_another_host(
    nursery: trio.Nursery,
    ca: trustme.CA,
    bundle: Path,
    tmp_path: Path,
) -> None:
    policy = await start_policy_server(nursery, ca, PolicyServer(policy_text("enforce", MX1)))
    port, handler = free_port(), MailWatcher()
    with (
        DnsServer(records()) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(ca, "mx.attacker.test")),
    ):
        (outcome,) = await agent(dns, port, bundle, policy, tmp_path).deliver(
            [item("bob@remote.test")]
        )
    assert (outcome.kind, outcome.status) == ("deferred", "4.7.5")
    assert outcome.text.startswith(
        "mta-sts enforce: TLS handshake failed: certificate verification failed"
    )
    assert handler.mails == []


async def test_testing_mode_delivers_and_logs_what_enforce_would_have_done(
    nursery: trio.Nursery,
    ca: trustme.CA,
    bundle: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = await start_policy_server(
        nursery, ca, PolicyServer(policy_text("testing", "mx7.remote.test"))
    )
    port, handler = free_port(), MailWatcher()
    with DnsServer(records()) as dns, aiosmtpd_peer(handler, "127.0.0.2", port):
        outcomes = await agent(dns, port, bundle, policy, tmp_path).deliver(
            [item("bob@remote.test")]
        )
    assert [o.kind for o in outcomes] == ["delivered"]
    assert [m.tls for m in handler.messages] == [False]
    (logged,) = attempts(caplog)
    assert (logged["tls_policy"], logged["mta_sts"]) == ("opportunistic", "testing")
    assert [e["would_defer"] for e in events(caplog, "mta_sts.testing")] == [
        "MX mx1.remote.test does not match the policy (mx: mx7.remote.test)",
        "the session was not encrypted",
    ]


async def test_testing_mode_reports_a_certificate_enforce_would_refuse(
    nursery: trio.Nursery,
    ca: trustme.CA,
    bundle: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = await start_policy_server(nursery, ca, PolicyServer(policy_text("testing", MX1)))
    port, handler = free_port(), MailWatcher()
    with (
        DnsServer(records()) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(ca, "other.test")),
    ):
        outcomes = await agent(dns, port, bundle, policy, tmp_path).deliver(
            [item("bob@remote.test")]
        )
    assert [o.kind for o in outcomes] == ["delivered"]
    (failure,) = events(caplog, "mta_sts.testing")
    assert failure["would_defer"].startswith("certificate: ")


async def test_enforce_policy_survives_a_restart_and_an_unreachable_policy_server(
    nursery: trio.Nursery,
    ca: trustme.CA,
    bundle: Path,
    tmp_path: Path,
) -> None:
    """Once an enforce policy is known, blocking the policy host afterwards (or a restart,
    or a new TXT id that cannot be fetched) must not let mail go in clear text."""
    policy = await start_policy_server(nursery, ca, PolicyServer(policy_text("enforce", MX1)))
    port, handler = free_port(), MailWatcher()
    with (
        DnsServer(records()) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(ca, MX1)),
    ):
        first = await agent(dns, port, bundle, policy, tmp_path).deliver([item("a@remote.test")])
    assert [o.kind for o in first] == ["delivered"]
    policy.stop()
    await trio.sleep(0)
    plain = MailWatcher()
    for txt_id in ("1", "2"):  # the same id, then a new one whose fetch fails
        with DnsServer(records(txt_id)) as dns, aiosmtpd_peer(plain, "127.0.0.2", port):
            restarted = agent(dns, port, bundle, policy, tmp_path)  # a new process's agent
            (outcome,) = await restarted.deliver([item("b@remote.test")])
        assert (outcome.kind, outcome.text) == ("deferred", "mta-sts enforce: STARTTLS not offered")
    assert plain.mails == []


async def test_a_new_txt_id_fetches_the_new_policy_and_the_same_id_does_not(
    nursery: trio.Nursery,
    ca: trustme.CA,
    bundle: Path,
    tmp_path: Path,
) -> None:
    server = await start_policy_server(nursery, ca, PolicyServer(policy_text("enforce", MX1)))
    port, handler = free_port(), MailWatcher()
    outcomes = []
    with aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(ca, MX1)):
        with DnsServer(records("1")) as dns:
            outcomes += await agent(dns, port, bundle, server, tmp_path).deliver(
                [item("a@remote.test")]
            )
        server.body = policy_text("enforce", "mx7.remote.test")
        with DnsServer(records("1")) as dns:  # same id: the cached policy, no fetch
            outcomes += await agent(dns, port, bundle, server, tmp_path).deliver(
                [item("b@remote.test")]
            )
        assert len(server.requests) == 1
        with DnsServer(records("2")) as dns:  # new id: refetched, and mx1 is out
            outcomes += await agent(dns, port, bundle, server, tmp_path).deliver(
                [item("c@remote.test")]
            )
    assert len(server.requests) == 2
    assert [o.kind for o in outcomes] == ["delivered", "delivered", "deferred"]
    assert "does not match the policy" in outcomes[2].text


async def test_a_policy_that_cannot_be_fetched_is_no_policy(
    nursery: trio.Nursery,
    ca: trustme.CA,
    bundle: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 8461 §3.3: a redirect is not followed; without a cached policy, mail goes as usual."""
    server = await start_policy_server(
        nursery, ca, PolicyServer(b"", status=301, headers=[("Location", "https://evil.test/")])
    )
    port, handler = free_port(), MailWatcher()
    with DnsServer(records()) as dns, aiosmtpd_peer(handler, "127.0.0.2", port):
        outcomes = await agent(dns, port, bundle, server, tmp_path).deliver(
            [item("bob@remote.test")]
        )
    assert [o.kind for o in outcomes] == ["delivered"]
    (failed,) = events(caplog, "mta_sts.fetch_failed")
    assert "HTTP 301 (a redirect" in failed["error"]
    assert attempts(caplog)[0]["tls_policy"] == "opportunistic"


# --- the fetch on its own -----------------------------------------------------------------


async def fetch(dns: DnsServer, server: PolicyServer, bundle: Path, **options: Any) -> str:
    return await fetch_policy(
        "remote.test",
        resolver=Resolver([dns.address], timeout=2.0),
        context=client_context("verify", ca_file=bundle),
        port=server.port,
        **options,
    )


async def test_fetch_returns_the_policy_text(
    nursery: trio.Nursery,
    ca: trustme.CA,
    bundle: Path,
) -> None:
    server = await start_policy_server(nursery, ca, PolicyServer(policy_text("enforce", MX1)))
    with DnsServer(records()) as dns:
        assert await fetch(dns, server, bundle) == policy_text("enforce", MX1).decode()


@pytest.mark.parametrize(
    "server, reason",
    [
        (PolicyServer(b"x" * (MAX_POLICY_SIZE + 1)), "over 65536"),
        (PolicyServer(b"", status=404), "answered HTTP 404, not 200"),
        (PolicyServer(b"", status=302, headers=[("Location", "/x")]), "a redirect"),
        (PolicyServer(b"\xff\xfe"), "not UTF-8"),
        (PolicyServer(stall=True), "timed out after 0.5s"),
    ],
)
async def test_fetch_failures_say_why(
    nursery: trio.Nursery, ca: trustme.CA, bundle: Path, server: PolicyServer, reason: str
) -> None:
    await start_policy_server(nursery, ca, server)
    with DnsServer(records()) as dns, pytest.raises(FetchError, match=reason):
        await fetch(dns, server, bundle, timeout=0.5)


async def test_fetch_refuses_a_certificate_for_another_name(
    nursery: trio.Nursery,
    ca: trustme.CA,
    bundle: Path,
) -> None:
    server = await start_policy_server(
        nursery, ca, PolicyServer(policy_text("enforce", MX1)), name="mta-sts.attacker.test"
    )
    with (
        DnsServer(records()) as dns,
        pytest.raises(FetchError, match="certificate verification failed"),
    ):
        await fetch(dns, server, bundle)


async def test_fetch_refuses_a_certificate_from_an_unknown_ca(
    nursery: trio.Nursery,
    bundle: Path,
) -> None:
    server = await start_policy_server(
        nursery, trustme.CA(), PolicyServer(policy_text("enforce", MX1))
    )
    with (
        DnsServer(records()) as dns,
        pytest.raises(FetchError, match="certificate verification failed"),
    ):
        await fetch(dns, server, bundle)
