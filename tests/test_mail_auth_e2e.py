"""SPEC §9 end to end: a real server signs what its users send and checks what it receives.

Every test talks SMTP to a server on 127.0.0.1 (smtplib), with the loopback DNS
server answering SPF, DKIM and DMARC lookups, and reads what landed in the Maildir.
Signatures are checked by OpenDKIM (independent of the code that made them).
"""

from __future__ import annotations

import logging
import re
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_mta.config import Config
from trio_mta.mta import MTA, serve

from .authhelpers import OPENDKIM, KeyPair, make_key, opendkim_verify, unique_domain
from .conftest import HOSTNAME
from .dnsserver import DnsServer
from .maildirs import wait_for_mail
from .test_dkim import dkimpy_sign, signature_fields

needs_opendkim = pytest.mark.skipif(OPENDKIM is None, reason="opendkim is not installed")


def send(
    port: int, sender: str, rcpt: str, message: bytes, *, helo: str = "client.test"
) -> tuple[int, str]:
    """One transaction; (code, text) of the first refusal, or of the DATA reply."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=30) as client:
        client.ehlo()
        for code, text in (client.mail(sender), client.rcpt(rcpt)):
            if code >= 400:
                return code, text.decode()
        code, text = client.data(message)
        return code, text.decode()


def header_block(path: Path) -> list[str]:
    """The header fields of a Maildir file (LF line ends), unfolded, in order."""
    head = path.read_bytes().split(b"\n\n", 1)[0].decode()
    return [f.replace("\n\t", " ").replace("\n ", " ") for f in re.split(r"\n(?![ \t])", head)]


def mail_auth_counts(mta: MTA) -> dict[tuple[str, str], float]:
    text = mta.metrics.render().decode()
    found = re.findall(
        r'^trio_mta_mail_auth_results_total\{method="(\w+)",result="(\w+)"\} (\S+)$', text, re.M
    )
    return {(m, r): float(v) for m, r, v in found}


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    folder.mkdir()
    return folder


# -- signing --------------------------------------------------------------------------------


@needs_opendkim
async def test_mail_from_a_trusted_client_is_signed_once_with_every_key(
    nursery: trio.Nursery, make_config: Callable[..., Config], keydir: Path, tmp_path: Path
) -> None:
    rsa = make_key(keydir, "sender.test", "r1", "rsa")
    ed = make_key(keydir, "sender.test", "e1", "ed25519")
    config = make_config(
        dkim={
            "sign": [
                {"domain": "sender.test", "selector": "r1", "key": str(rsa.key.path)},
                {"domain": "sender.test", "selector": "e1", "key": str(ed.key.path)},
            ]
        }
    )
    mta: MTA = await nursery.start(serve, config)
    message = (
        b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\n"
        b"Subject: signed on the way in\r\n\r\nHello Bob.\r\n.dot line\r\n"
    )
    # Loopback is trusted by default: this is a submission, so it is signed.
    code, _ = await trio.to_thread.run_sync(
        send, mta.address("smtp")[1], "alice@sender.test", "bob@example.test", message
    )
    assert code == 250
    [path] = await wait_for_mail(config.local.maildir_root, "bob")
    stored = path.read_bytes()
    fields = header_block(path)
    assert [f.split(":")[0] for f in fields[:5]] == [
        "Return-Path",
        "Delivered-To",
        "DKIM-Signature",
        "DKIM-Signature",
        "Received",
    ]
    assert "a=rsa-sha256" in fields[2] and "a=ed25519-sha256" in fields[3]
    # The Message-ID and Date we added for the submission are under the signature.
    assert "h=date:message-id:from:to:subject:from;" in fields[2].replace(" ", "")
    crlf = stored.replace(b"\n", b"\r\n")
    for index, pair in enumerate([rsa, ed]):
        only = crlf
        for other, field in enumerate(signature_fields(crlf)):
            if other != index:
                only = only.replace(field, b"")
        [verdict] = opendkim_verify(only, [pair], tmp_path / pair.key.selector)
        assert "succeeded" in verdict, verdict


async def test_internet_mail_for_local_domains_is_never_signed(
    nursery: trio.Nursery, make_config: Callable[..., Config], keydir: Path, dns_server: DnsServer
) -> None:
    key = make_key(keydir, "example.test", "s1", "ed25519")
    config = make_config(
        relay={"trusted_networks": []},
        dkim={"sign": [{"domain": "example.test", "selector": "s1", "key": str(key.key.path)}]},
    )
    mta: MTA = await nursery.start(serve, config)
    message = b"From: someone@example.test\r\nTo: bob@example.test\r\nSubject: in\r\n\r\nx\r\n"
    code, _ = await trio.to_thread.run_sync(
        send, mta.address("smtp")[1], "someone@example.test", "bob@example.test", message
    )
    assert code == 250
    [path] = await wait_for_mail(config.local.maildir_root, "bob")
    names = [f.split(":")[0] for f in header_block(path)]
    assert "DKIM-Signature" not in names
    assert names[2:4] == ["Authentication-Results", "Received"]


# -- verifying --------------------------------------------------------------------------------


def sender_zone(
    dns_server: DnsServer, keydir: Path, *, spf: str, dmarc: str | None
) -> tuple[str, KeyPair]:
    """A fresh sender domain with an SPF record, a published DKIM key and a DMARC policy."""
    domain = unique_domain("snd")
    dns_server.add(domain + ".", "TXT", f'"{spf}"')
    pair = make_key(keydir, domain, "sel", "ed25519")
    pair.publish(dns_server)
    if dmarc is not None:
        dns_server.add(f"_dmarc.{domain}.", "TXT", f'"{dmarc}"')
    return domain, pair


def inbound_message(domain: str, extra: bytes = b"") -> bytes:
    return (
        extra
        + f"From: news@{domain}\r\nTo: bob@example.test\r\n".encode()
        + b"Subject: inbound\r\nMessage-ID: <in@x>\r\n\r\nBody text.\r\n"
    )


async def untrusted_server(
    nursery: trio.Nursery, make_config: Callable[..., Config], **verify: Any
) -> tuple[MTA, Config]:
    config = make_config(relay={"trusted_networks": []}, verify=verify)
    return await nursery.start(serve, config), config


async def test_inbound_mail_gets_one_authentication_results_above_our_received(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    keydir: Path,
    dns_server: DnsServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    domain, pair = sender_zone(
        dns_server, keydir, spf="v=spf1 ip4:127.0.0.1 -all", dmarc="v=DMARC1; p=reject"
    )
    mta, config = await untrusted_server(nursery, make_config)
    forged = (
        f"Authentication-Results: {HOSTNAME}; dkim=pass header.d=bank.test\r\n"
        f"Authentication-Results: {HOSTNAME.upper()};\r\n\tspf=pass\r\n"
        "Authentication-Results: upstream.example; spf=fail\r\n"
    ).encode()
    signed = dkimpy_sign(inbound_message(domain, forged), pair, canon=(b"relaxed", b"relaxed"))
    code, _ = await trio.to_thread.run_sync(
        send, mta.address("smtp")[1], f"bounce@{domain}", "bob@example.test", signed
    )
    assert code == 250
    [path] = await wait_for_mail(config.local.maildir_root, "bob")
    fields = header_block(path)
    ours = [
        f
        for f in fields
        if f.lower().startswith("authentication-results:") and HOSTNAME in f.lower()
    ]
    assert len(ours) == 1, fields
    assert fields.index(ours[0]) == 2 and fields[3].startswith("Received: from client.test")
    [result] = ours
    assert f"spf=pass smtp.mailfrom=bounce@{domain}" in result
    assert re.search(rf"dkim=pass header\.d={re.escape(domain)} .*header\.s=sel", result)
    assert f"dmarc=pass (p=reject dis=none) header.from={domain}" in result
    assert "Authentication-Results: upstream.example; spf=fail" in fields
    assert "bank.test" not in path.read_text()

    [accepted] = [r for r in caplog.records if r.getMessage() == "smtpd.accepted"]
    logged = accepted.trio_mta_fields  # type: ignore[attr-defined]
    assert (logged["spf"], logged["dkim"], logged["dmarc"]) == ("pass", "pass", "pass")
    counts = mail_auth_counts(mta)
    assert counts[("spf", "pass")] == counts[("dkim", "pass")] == counts[("dmarc", "pass")] == 1


async def test_altered_signed_message_is_dkim_fail_and_dmarc_fail(
    nursery: trio.Nursery, make_config: Callable[..., Config], keydir: Path, dns_server: DnsServer
) -> None:
    domain, pair = sender_zone(dns_server, keydir, spf="v=spf1 -all", dmarc="v=DMARC1; p=none")
    mta, config = await untrusted_server(nursery, make_config)
    signed = dkimpy_sign(inbound_message(domain), pair, canon=(b"relaxed", b"relaxed"))
    code, _ = await trio.to_thread.run_sync(
        send,
        mta.address("smtp")[1],
        f"x@{domain}",
        "bob@example.test",
        signed.replace(b"Body text.", b"Changed text."),
    )
    assert code == 250
    [path] = await wait_for_mail(config.local.maildir_root, "bob")
    [result] = [f for f in header_block(path) if f.startswith("Authentication-Results")]
    assert "spf=fail" in result and "dkim=fail" in result
    assert "dmarc=fail (p=none dis=none)" in result
    assert mail_auth_counts(mta)[("dkim", "fail")] == 1


@pytest.mark.parametrize("enforce", [True, False])
async def test_dmarc_reject_is_refused_only_when_enforced(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    keydir: Path,
    dns_server: DnsServer,
    enforce: bool,
) -> None:
    domain, _ = sender_zone(dns_server, keydir, spf="v=spf1 -all", dmarc="v=DMARC1; p=reject")
    mta, config = await untrusted_server(nursery, make_config, dmarc_enforce=enforce)
    code, text = await trio.to_thread.run_sync(
        send, mta.address("smtp")[1], f"x@{domain}", "bob@example.test", inbound_message(domain)
    )
    if enforce:
        assert (code, text.split()[0]) == (550, "5.7.1"), text
        assert domain in text
        assert mta.store is not None
        assert await trio.to_thread.run_sync(mta.store.list_messages) == []
    else:
        assert code == 250
        [path] = await wait_for_mail(config.local.maildir_root, "bob")
        assert "dmarc=fail (p=reject dis=reject)" in path.read_text().replace("\n\t", " ")


@pytest.mark.parametrize("enforce", [True, False])
async def test_spf_fail_is_refused_at_rcpt_only_when_enforced(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    keydir: Path,
    dns_server: DnsServer,
    enforce: bool,
) -> None:
    domain, _ = sender_zone(dns_server, keydir, spf="v=spf1 ip4:192.0.2.1 -all", dmarc=None)
    mta, config = await untrusted_server(nursery, make_config, spf_enforce=enforce)
    code, text = await trio.to_thread.run_sync(
        send, mta.address("smtp")[1], f"x@{domain}", "bob@example.test", inbound_message(domain)
    )
    if enforce:
        assert (code, text.split()[0]) == (550, "5.7.23"), text
    else:
        assert code == 250
        [path] = await wait_for_mail(config.local.maildir_root, "bob")
        text = path.read_text()
        assert "spf=fail" in text and "dmarc=none" in text


async def test_dns_failure_is_temperror_and_the_mail_is_accepted(
    nursery: trio.Nursery, make_config: Callable[..., Config], dns_server: DnsServer
) -> None:
    domain = unique_domain("down")
    dns_server.servfail(domain + ".")
    dns_server.servfail(f"_dmarc.{domain}.")
    mta, config = await untrusted_server(nursery, make_config, spf_enforce=True, dmarc_enforce=True)
    with trio.fail_after(30):
        code, _ = await trio.to_thread.run_sync(
            send, mta.address("smtp")[1], f"x@{domain}", "bob@example.test", inbound_message(domain)
        )
    assert code == 250
    [path] = await wait_for_mail(config.local.maildir_root, "bob")
    result = path.read_text().replace("\n\t", " ")
    assert "spf=temperror" in result and "dmarc=temperror" in result and "dkim=none" in result


async def test_trusted_and_submission_mail_is_not_verified(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    config = make_config()  # loopback trusted
    mta: MTA = await nursery.start(serve, config)
    code, _ = await trio.to_thread.run_sync(
        send,
        mta.address("smtp")[1],
        "a@elsewhere.example",
        "bob@example.test",
        inbound_message(
            "elsewhere.example", f"Authentication-Results: {HOSTNAME}; dkim=pass\r\n".encode()
        ),
    )
    assert code == 250
    [path] = await wait_for_mail(config.local.maildir_root, "bob")
    # No check ran, so nothing was added; what the trusted client sent is kept as sent.
    assert [f for f in header_block(path) if f.startswith("Authentication-Results")] == [
        f"Authentication-Results: {HOSTNAME}; dkim=pass"
    ]


async def test_spooled_big_messages_are_signed_and_checked_too(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    keydir: Path,
    dns_server: DnsServer,
    tmp_path: Path,
) -> None:
    """Bodies past the spool threshold (64 KiB) live in a file: signing reads it, and a
    forged Authentication-Results is removed from the file itself."""
    line = b"a line of a message big enough to be spooled to a file on arrival\r\n"
    filler = line * (300_000 // len(line))
    domain, pair = sender_zone(
        dns_server, keydir, spf="v=spf1 ip4:127.0.0.1 -all", dmarc="v=DMARC1; p=reject"
    )
    mta, config = await untrusted_server(nursery, make_config)
    forged = f"Authentication-Results: {HOSTNAME}; dkim=pass header.d=bank.test\r\n".encode()
    inbound = dkimpy_sign(
        inbound_message(domain, forged) + filler, pair, canon=(b"relaxed", b"relaxed")
    )
    code, _ = await trio.to_thread.run_sync(
        send, mta.address("smtp")[1], f"x@{domain}", "bob@example.test", inbound
    )
    assert code == 250
    [path] = await wait_for_mail(config.local.maildir_root, "bob")
    text = path.read_text()
    assert len(text) > 290_000
    assert "bank.test" not in text
    [result] = [f for f in header_block(path) if f.startswith("Authentication-Results")]
    assert "dkim=pass" in result and "dmarc=pass" in result

    if OPENDKIM is None:
        return
    signer_key = make_key(keydir, "sender.test", "big", "ed25519")
    signing = make_config(
        dkim={
            "sign": [{"domain": "sender.test", "selector": "big", "key": str(signer_key.key.path)}]
        },
        state_dir=str(tmp_path / "state2"),
    )
    mta2: MTA = await nursery.start(serve, signing)
    message = b"From: alice@sender.test\r\nTo: carol@example.test\r\nSubject: big\r\n\r\n" + filler
    code, _ = await trio.to_thread.run_sync(
        send, mta2.address("smtp")[1], "alice@sender.test", "carol@example.test", message
    )
    assert code == 250
    [stored] = await wait_for_mail(signing.local.maildir_root, "carol")
    [verdict] = opendkim_verify(stored.read_bytes(), [signer_key], tmp_path / "od")
    assert "succeeded" in verdict, verdict
