"""DANE through a real validating resolver: Debian's unbound on loopback, validating a
zone signed at test time with ldns-signzone, with its own key as the only trust anchor.

unbound serves the signed zone itself (``auth-zone`` with ``for-upstream: yes``: the
data goes through its validator exactly as an upstream answer would), so no answer
reaches trio_mta with AD set unless its RRSIGs verified. Tampering with one signed
record after signing makes that name bogus (SERVFAIL), and the MTA must then refuse
the host rather than fall back to clear text.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import pytest
import trustme

from tests.policy_peers import MailWatcher, leaf_of, tlsa
from tests.test_client import FAST, aiosmtpd_peer, free_port
from tests.test_dane import _ctx
from tests.test_remote import attempts, item
from trio_mta.config import RelayConfig
from trio_mta.delivery.remote import RemoteAgent
from trio_mta.dns import Resolver
from trio_mta.testing.fake_dns import _bind_pair

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("unbound", "ldns-keygen", "ldns-signzone")),
    reason="needs unbound and ldnsutils (.ci/run installs them)",
)


def signed_zone(folder: Path, port: int, good: str, tampered: str) -> tuple[Path, Path]:
    """dane.test: its MX mx1 with TLSA *good*, and bad.dane.test whose mx2's TLSA is
    replaced by *tampered* after signing. Returns (signed zone file, trust anchor file)."""
    zone = folder / "dane.test.zone"
    zone.write_text(f"""$ORIGIN dane.test.
$TTL 300
@ IN SOA ns.dane.test. hostmaster.dane.test. 1 3600 900 86400 300
@ IN NS ns.dane.test.
ns IN A 127.0.0.1
@ IN MX 10 mx1.dane.test.
mx1 IN A 127.0.0.2
_{port}._tcp.mx1 IN TLSA {good}
bad IN MX 10 mx2.dane.test.
mx2 IN A 127.0.0.3
_{port}._tcp.mx2 IN TLSA {good}
""")
    key = subprocess.run(
        ["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", "dane.test"],
        cwd=folder,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run(
        ["ldns-signzone", "-n", str(zone), key], cwd=folder, check=True, capture_output=True
    )
    signed = folder / "dane.test.zone.signed"
    lines = signed.read_text().splitlines()
    owner = f"_{port}._tcp.mx2.dane.test."
    forged = [
        f"{owner}\t300\tIN\tTLSA\t{tampered}"
        if line.startswith(owner) and "\tTLSA\t" in line
        else line
        for line in lines
    ]
    assert forged != lines
    signed.write_text("\n".join(forged) + "\n")
    return signed, folder / f"{key}.key"


def free_dns_port() -> int:
    udp, tcp = _bind_pair()  # a port free for UDP and TCP, released for unbound to bind
    port: int = udp.getsockname()[1]
    udp.close()
    tcp.close()
    return port


def start_unbound(folder: Path, port: int, zone: Path, anchor: Path) -> subprocess.Popen[bytes]:
    conf = folder / "unbound.conf"
    conf.write_text(f"""server:
  interface: 127.0.0.1
  port: {port}
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "{folder}"
  pidfile: ""
  use-syslog: no
  logfile: "{folder / "unbound.log"}"
  do-not-query-localhost: no
  module-config: "validator iterator"
  trust-anchor-file: "{anchor}"
  local-zone: "test." nodefault
auth-zone:
  name: "dane.test"
  zonefile: "{zone}"
  for-upstream: yes
  for-downstream: no
  fallback-enabled: no
""")
    proc = subprocess.Popen(
        ["unbound", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        query = dns.message.make_query("dane.test", "MX")
        query.flags |= dns.flags.AD
        try:
            if dns.flags.AD & dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5).flags:
                return proc
        except (dns.exception.Timeout, OSError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"unbound did not start validating: {err.decode()}")


async def test_dane_through_a_validating_unbound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    folder, dns_port = tmp_path, free_dns_port()
    smtp_port = free_port()
    cert = trustme.CA().issue_cert("mx1.dane.test")  # a CA nobody trusts: DANE is the proof
    good = tlsa(3, 1, 1, leaf_of(cert))
    zone, anchor = signed_zone(folder, smtp_port, good, "3 1 1 " + "ab" * 32)
    proc = start_unbound(folder, dns_port, zone, anchor)
    try:
        resolver = Resolver([("127.0.0.1", dns_port)], timeout=3.0)
        (mx,) = await resolver.mail_hosts("dane.test")
        assert mx.authenticated
        agent = RemoteAgent(
            RelayConfig(port=smtp_port), resolver, hostname="relay.local.test", timeouts=FAST
        )
        good_mx, bad_mx = MailWatcher(), MailWatcher()
        with (
            aiosmtpd_peer(good_mx, "127.0.0.2", smtp_port, tls_context=_ctx(cert)),
            aiosmtpd_peer(bad_mx, "127.0.0.3", smtp_port, tls_context=_ctx(cert)),
        ):
            delivered = await agent.deliver([item("bob@dane.test")])
            bogus = await agent.deliver([item("carol@bad.dane.test", message_id="Q2")])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert [o.kind for o in delivered] == ["delivered"]
    assert attempts(caplog)[0]["tls_policy"] == "dane"
    assert [m.tls for m in good_mx.messages] == [True]
    (outcome,) = bogus
    assert outcome.kind == "deferred"
    assert outcome.text.startswith("dane: TLSA lookup for authenticated MX mx2.dane.test failed")
    assert "SERVFAIL" in outcome.text
    assert bad_mx.ehlos == []
