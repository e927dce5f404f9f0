"""Milters we did not write: real rspamd and OpenDKIM, run privately on loopback."""

from __future__ import annotations

import email
import shutil
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import dns.resolver
import pytest
import trio

import trio_mta
from trio_mta.config import Config

from .dnsserver import DnsServer
from .maildirs import new_files, wait_for_mail
from .milterd import opendkim, rspamd

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _message(body: str, sender: str = "alice@example.test") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: bob@example.test\r\nSubject: test\r\n"
        f"Date: Wed, 02 Dec 2026 04:00:00 +0000\r\nMessage-ID: <m1@example.test>\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def _send(port: int, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.example.test")
        client.mail("alice@example.test")
        client.rcpt("bob@example.test")
        try:
            return client.data(data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error


@pytest.fixture(scope="module")
def rspamd_address(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DnsServer
) -> Iterator[str]:
    if shutil.which("rspamd") is None:
        pytest.skip("rspamd is not installed (.ci/run installs it)")
    with rspamd(tmp_path_factory.mktemp("rspamd"), dns_server.address) as address:
        yield address


async def _serve(
    nursery: trio.Nursery, make_config: Callable[..., Config], *addresses: str, reuse: bool = False
) -> trio_mta.MTA:
    milters = [{"address": a, "timeout": "60s", "reuse_connections": reuse} for a in addresses]
    mta: trio_mta.MTA = await nursery.start(
        lambda task_status: trio_mta.serve(make_config(milter=milters), task_status=task_status)
    )
    return mta


async def test_rspamd_rejects_gtube(
    nursery: trio.Nursery, make_config: Callable[..., Config], rspamd_address: str
) -> None:
    mta = await _serve(nursery, make_config, rspamd_address)
    code, text = await trio.to_thread.run_sync(_send, mta.address("smtp")[1], _message(GTUBE))
    assert code == 554 and text.startswith(b"5.7.1 Gtube"), (code, text)
    await trio.sleep(0.5)
    assert new_files(mta.config.local.maildir_root, "bob") == []


async def test_rspamd_adds_its_result_header_to_a_normal_message(
    nursery: trio.Nursery, make_config: Callable[..., Config], rspamd_address: str
) -> None:
    mta = await _serve(nursery, make_config, rspamd_address)
    code, _ = await trio.to_thread.run_sync(
        _send, mta.address("smtp")[1], _message("Hello Bob,\r\nsee you tomorrow.\r\n")
    )
    assert code == 250
    [path] = await wait_for_mail(mta.config.local.maildir_root, "bob", timeout=30)
    msg = email.message_from_bytes(path.read_bytes())
    assert msg["X-Spamd-Result"] is not None and "default:" in msg["X-Spamd-Result"]
    assert msg["X-Rspamd-Queue-Id"] is not None
    assert msg.get_payload().startswith("Hello Bob,")


async def test_rspamd_scans_every_session_on_a_kept_connection(
    nursery: trio.Nursery, make_config: Callable[..., Config], rspamd_address: str
) -> None:
    """rspamd honours SMFIC_QUIT_NC: after a clean message, GTUBE on the same milter
    connection is still refused, and the next message still gets its own verdict."""
    mta = await _serve(nursery, make_config, rspamd_address, reuse=True)
    port = mta.address("smtp")[1]
    root = mta.config.local.maildir_root
    kept = mta.state.milter_pool
    for n, (body, expected) in enumerate(
        [("Hello Bob, first.", 250), (GTUBE, 554), ("Hello Bob, third.", 250)]
    ):
        code, _ = await trio.to_thread.run_sync(_send, port, _message(body))
        assert code == expected, (n, code)
        with trio.fail_after(10):  # handed back once the session is over
            while kept.idle_count() != 1:
                await trio.sleep(0.02)
    paths = await wait_for_mail(root, "bob", count=2, timeout=30)
    bodies = [email.message_from_bytes(p.read_bytes()) for p in paths]
    assert sorted(m.get_payload().split(",")[1].strip() for m in bodies) == ["first.", "third."]
    assert all("default:" in (m["X-Spamd-Result"] or "") for m in bodies)
    assert len({m["X-Rspamd-Queue-Id"] for m in bodies}) == 2
    assert kept.created == 1


async def test_opendkim_signature_is_added_and_verifies(
    nursery: trio.Nursery, make_config: Callable[..., Config], tmp_path: Path, dns_server: DnsServer
) -> None:
    if shutil.which("opendkim") is None or shutil.which("opendkim-genkey") is None:
        pytest.skip("opendkim/opendkim-tools are not installed (.ci/run installs them)")
    with opendkim(tmp_path / "opendkim", "example.test") as (address, record):
        dns_server.add(
            "test._domainkey.example.test.",
            "TXT",
            " ".join(f'"{record[i : i + 200]}"' for i in range(0, len(record), 200)),
        )
        mta = await _serve(nursery, make_config, address)
        code, _ = await trio.to_thread.run_sync(
            _send, mta.address("smtp")[1], _message("Signed, sealed,\r\ndelivered.\r\n")
        )
        assert code == 250
        [path] = await wait_for_mail(mta.config.local.maildir_root, "bob", timeout=30)
    stored = path.read_bytes()
    assert b"DKIM-Signature:" in stored
    # Maildir stores LF; the signed form is the CRLF message after our delivery headers.
    signed = stored.split(b"DKIM-Signature:", 1)[1]
    message = (b"DKIM-Signature:" + signed).replace(b"\n", b"\r\n")

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.address[0]]
    resolver.port = dns_server.address[1]

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    assert dkim.verify(message, dnsfunc=lookup)
    tampered = message.replace(b"delivered.", b"DELIVERED.")
    assert not dkim.verify(tampered, dnsfunc=lookup)
