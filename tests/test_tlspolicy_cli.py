"""What an administrator sees of TLS policies: ``queue show`` names the policy that
deferred a recipient, and ``trio-mta tls-policy DOMAIN`` explains a destination."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import trio
import trustme

from tests.dnsserver import DnsServer
from tests.policy_peers import (
    MailWatcher,
    PolicyServer,
    leaf_of,
    policy_text,
    start_policy_server,
    tlsa,
)
from tests.test_client import FAST, MX1, aiosmtpd_peer, free_port, server_tls
from trio_mta.config import RelayConfig
from trio_mta.delivery.maildir import MaildirAgent
from trio_mta.delivery.remote import RemoteAgent
from trio_mta.dns import Resolver
from trio_mta.queue.report import format_show
from trio_mta.queue.scheduler import Scheduler
from trio_mta.queue.store import NewMessage, NewRecipient, QueueStore

BODY = b"From: alice@local.test\r\nSubject: hi\r\n\r\nhello\r\n"


async def test_queue_show_names_the_policy_that_deferred_a_recipient(tmp_path: Path) -> None:
    port, handler = free_port(), MailWatcher()
    published, served = trustme.CA().issue_cert(MX1), trustme.CA()
    records = {
        "remote.test": [("MX", "10 mx1.remote.test.")],
        "mx1.remote.test": [("A", "127.0.0.2")],
        f"_{port}._tcp.mx1.remote.test": [("TLSA", tlsa(3, 1, 1, leaf_of(published)))],
    }
    store = QueueStore(tmp_path / "queue.sqlite3")
    message = NewMessage(
        "alice@local.test", (NewRecipient("bob@remote.test", "bob@remote.test", None),), BODY
    )
    store.insert([("Q1", message)], now=time.time())
    with (
        DnsServer(records, authenticated=True) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(served, MX1)),
    ):
        agent = RemoteAgent(
            RelayConfig(port=port),
            Resolver([dns.address], timeout=2.0),
            hostname="relay.local.test",
            timeouts=FAST,
        )
        scheduler = Scheduler(
            store,
            local_agent=MaildirAgent(tmp_path, "relay.local.test", limiter=trio.CapacityLimiter(1)),
            remote_agent=agent,
            retry_initial=60,
            retry_max=60,
            max_age=3600,
            concurrency=1,
            poll_interval=0.05,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await nursery.start(scheduler.run)
            with trio.fail_after(10):
                while scheduler.deferred < 1:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    info = store.show("Q1")
    store.close()
    assert info is not None
    shown = format_show(info)
    assert "4.7.5 dane: certificate matches none of 1 usable TLSA records" in shown
    assert f"at _{port}._tcp.mx1.remote.test (mx1.remote.test[127.0.0.2], tls)" in shown
    assert handler.mails == []


async def test_tls_policy_command_explains_a_destination(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tmp_path: Path,
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    policy = await start_policy_server(
        nursery, ca, PolicyServer(policy_text("enforce", "mx1.remote.test", max_age=604800))
    )
    cert = trustme.CA().issue_cert(MX1)
    records = {
        "remote.test": [("MX", "10 mx1.remote.test."), ("MX", "20 mx2.remote.test.")],
        "mx1.remote.test": [("A", "127.0.0.2")],
        "mx2.remote.test": [("A", "127.0.0.3")],
        "_25._tcp.mx1.remote.test": [
            ("TLSA", tlsa(3, 1, 1, leaf_of(cert))),
            ("TLSA", tlsa(1, 1, 1, leaf_of(cert))),
        ],
        "_mta-sts.remote.test": [("TXT", '"v=STSv1; id=2026a"')],
        "mta-sts.remote.test": [("A", "127.0.0.1")],
    }
    config = tmp_path / "mta.toml"
    with DnsServer(records, authenticated=True) as dns:
        host, dns_port = dns.address
        config.write_text(
            f'state_dir = "{tmp_path / "state"}"\n'
            f'[dns]\nnameservers = ["{host}:{dns_port}"]\n'
            f'[relay]\nca_file = "{bundle}"\nmta_sts_port = {policy.port}\n'
        )
        result = await trio.run_process(
            [
                sys.executable,
                "-m",
                "trio_mta",
                "tls-policy",
                "Remote.Test",
                "--config",
                str(config),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ},
        )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    lines = out.splitlines()
    assert lines[0] == "destination: remote.test"
    assert lines[1] == f"DNS: {host}:{dns_port}; AD bit trusted: yes"
    assert "MTA-STS: mode enforce, max_age 604800s, mx: mx1.remote.test" in lines
    assert any(
        line.startswith("  policy id 2026a, fetched 0s ago, expires in 1w (fetched;")
        for line in lines
    ), out
    assert "MX 10 mx1.remote.test (127.0.0.2) authenticated: yes" in lines
    assert "  TLSA _25._tcp.mx1.remote.test: 2 record(s), authenticated: yes" in lines
    assert any(
        line.endswith("unusable: PKIX-EE is not used for SMTP (RFC 7672 §3.1.3)") for line in lines
    )
    assert (
        "  tls_policy=dane: STARTTLS required; the certificate must match a usable TLSA record"
    ) in lines
    assert "  TLSA _25._tcp.mx2.remote.test: none" in lines
    assert (
        "  tls_policy=mta-sts: host NOT used: mta-sts enforce: MX mx2.remote.test does not "
        "match the policy of remote.test (mx: mx1.remote.test)"
    ) in lines
    assert not (tmp_path / "state" / "mta-sts").exists()  # looked, stored nothing
