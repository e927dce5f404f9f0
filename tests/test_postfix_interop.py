"""Interop with a real MTA: a private Postfix on loopback, both directions, over STARTTLS.

trio_mta -> Postfix: trio_mta finds pf.test's MX in the test DNS server, reaches
Postfix's smtpd on ``[relay] port`` and delivers with ``tls = "verify"`` against
the trustme CA, so the mail only gets through when the certificate and the name
mx.pf.test check out; Postfix's virtual(8) files it into a Maildir.
Postfix -> trio_mta: a message submitted to Postfix for trio.test leaves through
Postfix's smtp(8) (transport map to trio_mta's port, ``smtp_tls_security_level =
may``) and lands in trio_mta's Maildir. Each side's Received header must record
the TLS session the other side negotiated.
"""

from __future__ import annotations

import logging
import re
import smtplib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from trio_mta.config import Config
from trio_mta.mta import MTA, serve
from trio_mta.queue.store import QueuedMessage

from .dnsserver import DnsServer
from .maildirs import wait_for_mail
from .postfix_instance import PostfixInstance, free_port, running_postfix, unavailable

SKIP_REASON = unavailable()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

PF_HOST = "mx.pf.test"
TRIO_HOST = "mx.example.test"  # conftest's HOSTNAME: trio_mta's name in its headers
DELIVERY_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def trio_port() -> int:
    """trio_mta's inbound port, fixed before Postfix starts: its transport map names it."""
    return free_port()


@pytest.fixture(scope="module")
def postfix(
    ca: trustme.CA, trio_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostfixInstance]:
    certs = tmp_path_factory.mktemp("postfix-tls")
    cert = ca.issue_cert(PF_HOST)
    chain, key = certs / "chain.pem", certs / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    with running_postfix(
        tls_chain=chain,
        tls_key=key,
        virtual_domain="pf.test",
        mailboxes={"someone@pf.test": "someone", "refused@pf.test": "refused"},
        transports={"trio.test": f"smtp:[127.0.0.1]:{trio_port}"},
    ) as instance:
        yield instance


@pytest.fixture(scope="module")
def pf_dns(dns_server: DnsServer) -> None:
    """pf.test's MX points at Postfix's address; the port comes from ``[relay] port``."""
    dns_server.add("pf.test.", "MX", f"10 {PF_HOST}.")
    dns_server.add(f"{PF_HOST}.", "A", "127.0.0.1")


@pytest.fixture(autouse=True)
def _show_maillog(postfix: PostfixInstance, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Print Postfix's log lines of this test; pytest shows them when the test fails."""
    caplog.set_level(logging.INFO, logger="trio_mta")
    start = len(postfix.log_text())
    yield
    print(f"--- Postfix maillog ({postfix.maillog}) ---")
    print(postfix.log_text()[start:])


def submit(port: int, sender: str, rcpt: str, message: bytes) -> str:
    """One plain SMTP transaction from a trusted loopback client; the DATA reply text."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        code, text = client.ehlo()
        assert code == 250, text
        code, text = client.mail(sender)
        assert code == 250, text
        code, text = client.rcpt(rcpt)
        assert code == 250, text
        code, text = client.data(message)
        assert code == 250, text
        return text.decode()


async def wait_for_postfix_mail(postfix: PostfixInstance, mailbox: str) -> Path:
    with trio.move_on_after(DELIVERY_TIMEOUT):
        while not postfix.maildir_new(mailbox):
            await trio.sleep(0.05)
    files = postfix.maildir_new(mailbox)
    assert len(files) == 1, f"Postfix Maildir {mailbox}/new holds {files}"
    return files[0]


async def wait_for_empty_queue(mta: MTA) -> list[QueuedMessage]:
    """The queue's unfinished messages once none is left, or as they stand at the timeout."""
    assert mta.store is not None
    rows: list[QueuedMessage] = []
    with trio.move_on_after(DELIVERY_TIMEOUT):
        while rows := await trio.to_thread.run_sync(mta.store.list_messages):
            await trio.sleep(0.05)
    return rows


def attempts(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        dict(r.trio_mta_fields)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "delivery.attempt"
    ]


async def test_trio_mta_relays_to_postfix_over_verified_starttls(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    tls_files: tuple[Path, Path, Path],
    postfix: PostfixInstance,
    pf_dns: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, _, ca_bundle = tls_files
    config = make_config(
        local={"domains": ["trio.test"]},
        relay={"port": postfix.port, "tls": "verify", "ca_file": str(ca_bundle)},
    )
    mta: MTA = await nursery.start(serve, config)
    message = (
        b"From: alice@trio.test\r\nTo: someone@pf.test\r\nSubject: to postfix\r\n\r\n"
        b"Hello Postfix.\r\n.leading dot\r\n"
    )
    reply = await trio.to_thread.run_sync(
        submit, mta.address("smtp")[1], "alice@trio.test", "someone@pf.test", message
    )
    queue_id = reply.rsplit(" ", 1)[1]

    content = (await wait_for_postfix_mail(postfix, "someone")).read_bytes()
    assert content.startswith(b"Return-Path: <alice@trio.test>\n"), content[:200]
    assert b"\nDelivered-To: someone@pf.test\n" in content
    # Postfix's own trace header: trio_mta's EHLO name, TLS 1.3, ESMTPS (RFC 3848).
    assert (
        b"\nReceived: from mx.example.test (unknown [127.0.0.1])\n\t(using TLSv1.3 with cipher "
    ) in content, content.decode()
    assert b"\tby mx.pf.test (Postfix) with ESMTPS id " in content
    # trio_mta's header from the submission travelled below it, untouched.
    assert f"\tby {TRIO_HOST} (trio_mta) with ESMTP id {queue_id}".encode() in content
    assert content.index(b"(Postfix)") < content.index(b"(trio_mta)")
    assert content.endswith(b"\n\nHello Postfix.\n.leading dot\n"), content[-80:]

    assert await wait_for_empty_queue(mta) == []
    [attempt] = attempts(caplog)
    assert (attempt["host"], attempt["address"]) == (PF_HOST, "127.0.0.1")
    assert attempt["tls"].startswith("TLSv1.3"), attempt
    assert attempt["outcome"] == "delivered", attempt


async def test_verify_refuses_postfix_cert_outside_trust_store(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    postfix: PostfixInstance,
    pf_dns: None,
    tmp_path: Path,
) -> None:
    """The other half of the proof: with a CA that did not sign Postfix's certificate,
    ``verify`` sends nothing and keeps the message deferred."""
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    config = make_config(
        local={"domains": ["trio.test"]},
        relay={"port": postfix.port, "tls": "verify", "ca_file": str(other)},
        queue={"retry_initial": "60s", "retry_max": "60s"},
    )
    mta: MTA = await nursery.start(serve, config)
    await trio.to_thread.run_sync(
        submit,
        mta.address("smtp")[1],
        "alice@trio.test",
        "refused@pf.test",
        b"Subject: never\r\n\r\nnot for an unverified peer\r\n",
    )
    assert mta.store is not None
    with trio.move_on_after(DELIVERY_TIMEOUT):
        while True:
            [row] = await trio.to_thread.run_sync(mta.store.list_messages)
            [rcpt] = row.recipients
            if rcpt.status == "deferred":
                break
            await trio.sleep(0.05)
    assert rcpt.status == "deferred", rcpt
    assert "certificate" in (rcpt.last_error or ""), rcpt
    assert postfix.maildir_new("refused") == []


async def test_postfix_relays_to_trio_mta_over_starttls(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    postfix: PostfixInstance,
    trio_port: int,
) -> None:
    config = make_config(
        listen=[{"address": f"127.0.0.1:{trio_port}", "mode": "smtp"}],
        local={"domains": ["trio.test"]},
    )
    mta: MTA = await nursery.start(serve, config)
    message = (
        b"From: carol@pf.test\r\nTo: user@trio.test\r\nSubject: from postfix\r\n\r\n"
        b"Hello trio_mta.\r\n"
    )
    reply = await trio.to_thread.run_sync(
        submit, postfix.port, "carol@pf.test", "user@trio.test", message
    )
    postfix_id = reply.rsplit(" ", 1)[1]

    [path] = await wait_for_mail(mta.config.local.maildir_root, "user", timeout=DELIVERY_TIMEOUT)
    content = path.read_bytes()
    assert content.startswith(b"Return-Path: <carol@pf.test>\n"), content[:200]
    # trio_mta's trace header: Postfix's EHLO name, the TLS session Postfix's
    # smtp client opened with STARTTLS, ESMTPS.
    assert (
        b"\nReceived: from mx.pf.test ([127.0.0.1])\n\t(using TLSv1.3 with cipher "
    ) in content, content.decode()
    assert f"\tby {TRIO_HOST} (trio_mta) with ESMTPS id ".encode() in content
    # Postfix's header from the submission, with the id its smtpd gave us.
    assert (
        b"\nReceived: from client.test (unknown [127.0.0.1])\n"
        b"\tby mx.pf.test (Postfix) with ESMTP id " + postfix_id.encode()
    ) in content
    assert content.index(b"(trio_mta)") < content.index(b"(Postfix)")
    assert content.endswith(b"\n\nHello trio_mta.\n"), content[-80:]

    # Postfix's side of the story: TLS to our port, and the message handed over.
    # Postfix logs "status=sent" only after our 250, and trio_mta may have put
    # the message in the Maildir before then, so the log is polled for it.
    sent_line = re.compile(
        rf"{postfix_id}: to=<user@trio\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{trio_port},"
        r".* status=sent \(250 2\.0\.0 Ok: queued as (\S+)\)"
    )
    with trio.move_on_after(DELIVERY_TIMEOUT):
        while (sent := sent_line.search(log := postfix.log_text())) is None:
            await trio.sleep(0.05)
    assert f"TLS connection established to 127.0.0.1[127.0.0.1]:{trio_port}: TLSv1.3" in log
    assert sent is not None, log
    # ... and the queue id trio_mta answered with is the one in its Received header.
    assert f"(trio_mta) with ESMTPS id {sent[1]}".encode() in content


def test_instance_leaves_no_process_behind(
    ca: trustme.CA, tmp_path: Path, postfix: PostfixInstance
) -> None:
    """A second instance starts next to the module's one, owns only its processes,
    and stopping it ends all of them (the module's instance keeps answering)."""
    cert = ca.issue_cert(PF_HOST)
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    with running_postfix(
        tls_chain=chain, tls_key=key, virtual_domain="other.test", mailboxes={"x@other.test": "x"}
    ) as second:
        pids = second.processes()
        assert second.master_pid() in pids
        assert not set(pids) & set(postfix.processes())
    assert second.processes() == []
    assert not second.root.exists()
    with socket.create_connection(("127.0.0.1", postfix.port), timeout=5) as sock:
        assert sock.recv(100).startswith(b"220 mx.pf.test ESMTP")
