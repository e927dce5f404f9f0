"""STARTTLS, implicit TLS and AUTH over real sockets with trustme certificates."""

from __future__ import annotations

import dataclasses
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from trio_mta.config import Config, TlsConfig
from trio_mta.mta import MTA, serve
from trio_mta.server.passwords import PasswordFile

from .conftest import HOSTNAME
from .maildirs import wait_for_mail
from .rawsmtp import RawClient

USER, PASSWORD = "alice", "correct horse battery staple"


@pytest.fixture
def client_context(tls_files: tuple[Path, Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files[2]))


@pytest.fixture
async def server(nursery: trio.Nursery, make_config: Callable[..., Config]) -> MTA:
    config = make_config(relay={"trusted_networks": []})
    PasswordFile(config.auth.users_file).set_password(USER, PASSWORD)
    mta: MTA = await nursery.start(serve, config)
    mta.state.auth_failure_delay = 0.01
    return mta


def _starttls_send(port: int, ctx: ssl.SSLContext, login: bool, rcpt: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("c.test")
        assert not client.has_extn("auth"), "AUTH must not be offered in plain text"
        client.starttls(context=ctx)
        client.ehlo("c.test")
        assert not client.has_extn("starttls")
        assert "PLAIN" in client.esmtp_features["auth"].upper()
        if login:
            client.login(USER, PASSWORD)
        refused = client.sendmail("alice@example.test", [rcpt], b"Subject: tls\r\n\r\nover TLS\r\n")
        assert refused == {}
        return "ok"


async def test_starttls_with_smtplib(server: MTA, client_context: ssl.SSLContext) -> None:
    _, port = server.address("smtp")
    client_context.check_hostname = False
    await trio.to_thread.run_sync(_starttls_send, port, client_context, False, "bob@example.test")
    [path] = await wait_for_mail(server.config.local.maildir_root, "bob")
    assert b"(using TLSv1.3 with cipher " in path.read_bytes()
    assert b"with ESMTPS id" in path.read_bytes()


async def test_submission_requires_auth_then_relays(
    server: MTA, client_context: ssl.SSLContext
) -> None:
    _, port = server.address("submission")
    client_context.check_hostname = False

    def unauthenticated() -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.starttls(context=client_context)
            client.ehlo("c.test")
            return client.mail("alice@example.test")[0]

    assert await trio.to_thread.run_sync(unauthenticated) == 530
    await trio.to_thread.run_sync(_starttls_send, port, client_context, True, "far@remote.test")
    rows = await trio.to_thread.run_sync(server.store.list_messages)
    assert [r.address for row in rows for r in row.recipients] == ["far@remote.test"]
    shown = await trio.to_thread.run_sync(server.store.show, rows[0].id)
    assert shown is not None
    assert "Authenticated sender: alice" in shown.headers


async def test_relay_denied_before_auth_on_smtp(
    server: MTA, client_context: ssl.SSLContext
) -> None:
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"STARTTLS")
    client_context.check_hostname = False
    await client.starttls(client_context, HOSTNAME)
    await client.command(b"EHLO c.test")
    await client.command(b"MAIL FROM:<alice@example.test>")
    assert (await client.command(b"RCPT TO:<far@remote.test>")).startswith(b"554 5.7.1")
    await client.command(b"RSET")
    token = trio_b64(f"\0{USER}\0{PASSWORD}")
    assert (await client.command(b"AUTH PLAIN " + token)).startswith(b"235 2.7.0")
    await client.command(b"MAIL FROM:<alice@example.test>")
    assert (await client.command(b"RCPT TO:<far@remote.test>")).startswith(b"250")


def trio_b64(text: str) -> bytes:
    import base64

    return base64.b64encode(text.encode())


async def test_implicit_tls_smtps(server: MTA, client_context: ssl.SSLContext) -> None:
    _, port = server.address("smtps")

    def send() -> None:
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=client_context) as client:
            client.ehlo("c.test")
            assert not client.has_extn("starttls")
            client.login(USER, PASSWORD)
            client.sendmail(
                "alice@example.test", ["carol@example.test"], b"Subject: smtps\r\n\r\nimplicit\r\n"
            )

    client_context.check_hostname = False
    await trio.to_thread.run_sync(send)
    await wait_for_mail(server.config.local.maildir_root, "carol")


async def test_starttls_injection_is_discarded(server: MTA, client_context: ssl.SSLContext) -> None:
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.send(b"STARTTLS\r\nRSET\r\n")  # one write: RSET is the injected command
    assert (await client.reply()).startswith(b"220 2.0.0")
    client_context.check_hostname = False
    await client.starttls(client_context, HOSTNAME)
    # The first reply after the handshake must be the one to our EHLO, not to RSET.
    reply = await client.command(b"EHLO c.test")
    assert reply.startswith(b"250-"), reply
    assert b"AUTH PLAIN LOGIN" in reply and b"STARTTLS" not in reply
    assert (await client.command(b"STARTTLS")).startswith(b"503 5.5.1")


async def test_auth_plain_and_login_failures(server: MTA, client_context: ssl.SSLContext) -> None:
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    assert (await client.command(b"AUTH PLAIN " + trio_b64("\0a\0b"))).startswith(b"538 5.7.11")
    await client.command(b"STARTTLS")
    client_context.check_hostname = False
    await client.starttls(client_context, HOSTNAME)
    await client.command(b"EHLO c.test")
    assert (await client.command(b"AUTH PLAIN " + trio_b64(f"\0{USER}\0wrong"))).startswith(
        b"535 5.7.8"
    )
    assert (await client.command(b"AUTH LOGIN")).startswith(b"334 VXNlcm5hbWU6")
    assert (await client.command(trio_b64(USER))).startswith(b"334 UGFzc3dvcmQ6")
    assert (await client.command(b"*")).startswith(b"501")
    assert (await client.command(b"AUTH LOGIN")).startswith(b"334")
    await client.command(trio_b64(USER))
    assert (await client.command(trio_b64(PASSWORD))).startswith(b"235 2.7.0")


async def test_too_many_auth_failures_close(server: MTA, client_context: ssl.SSLContext) -> None:
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"STARTTLS")
    client_context.check_hostname = False
    await client.starttls(client_context, HOSTNAME)
    await client.command(b"EHLO c.test")
    for _ in range(3):
        assert (await client.command(b"AUTH PLAIN " + trio_b64(f"\0{USER}\0bad"))).startswith(
            b"535"
        )
    assert (await client.reply()).startswith(b"421 4.7.0")
    assert await client.eof()


async def test_stalled_handshake_times_out_without_harm(
    nursery: trio.Nursery, make_config: Callable[..., Config], client_context: ssl.SSLContext
) -> None:
    mta: MTA = await nursery.start(serve, make_config(limits={"command_timeout": 0.5}))
    staller = await trio.open_tcp_stream(*mta.address("smtps"))  # never sends a ClientHello
    # Others are served meanwhile.
    client_context.check_hostname = False

    def quick() -> int:
        with smtplib.SMTP_SSL(
            "127.0.0.1", mta.address("smtps")[1], timeout=5, context=client_context
        ) as client:
            return client.noop()[0]

    assert await trio.to_thread.run_sync(quick) == 250
    with trio.fail_after(5):
        assert await staller.receive_some(100) == b""


async def test_generated_certificate_is_reused(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    # No [tls] keys: a self-signed pair is generated into state_dir (SPEC §3).
    config = dataclasses.replace(make_config(), tls=TlsConfig())
    first: MTA = await nursery.start(serve, config)
    cert = config.state_dir / "tls" / "cert.pem"
    original = cert.read_bytes()
    first.stop()
    await trio.sleep(0.2)
    second: MTA = await nursery.start(serve, config)
    assert cert.read_bytes() == original
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False

    def handshake() -> str:
        with smtplib.SMTP_SSL(
            "127.0.0.1", second.address("smtps")[1], timeout=5, context=ctx
        ) as client:
            return str(client.sock.version())  # type: ignore[union-attr]

    assert (await trio.to_thread.run_sync(handshake)).startswith("TLSv1.")


async def _tls_client(server: MTA, client_context: ssl.SSLContext) -> RawClient:
    """A raw client that has said EHLO over STARTTLS (so AUTH is offered)."""
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"STARTTLS")
    client_context.check_hostname = False
    await client.starttls(client_context, HOSTNAME)
    await client.command(b"EHLO c.test")
    return client


async def test_auth_plain_refuses_a_foreign_authorization_identity(
    server: MTA, client_context: ssl.SSLContext
) -> None:
    # RFC 4616 §2: authzid "bob" with alice's credentials asks to act as bob;
    # without proxy authorization that must fail, not log in as alice.
    client = await _tls_client(server, client_context)
    reply = await client.command(b"AUTH PLAIN " + trio_b64(f"bob\0{USER}\0{PASSWORD}"))
    assert reply.startswith(b"535 5.7.8"), reply
    # An authzid equal to the authcid is the same identity: accepted.
    reply = await client.command(b"AUTH PLAIN " + trio_b64(f"{USER}\0{USER}\0{PASSWORD}"))
    assert reply.startswith(b"235 2.7.0"), reply


async def test_received_names_utf8smtp_for_smtputf8_transactions(
    server: MTA, client_context: ssl.SSLContext
) -> None:
    # RFC 6531 §3.7.3: a transaction that used SMTPUTF8 is "with UTF8SMTP[S][A]".
    client_context.check_hostname = False

    def send(port: int, tls: bool, rcpt: str) -> None:
        client: smtplib.SMTP
        if tls:
            client = smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=client_context)
        else:
            client = smtplib.SMTP("127.0.0.1", port, timeout=10)
        with client:
            client.ehlo("c.test")
            if tls:
                client.login(USER, PASSWORD)
            client.sendmail(
                "jörg@remote.test", [rcpt], b"Subject: eai\r\n\r\nhi\r\n", mail_options=["SMTPUTF8"]
            )

    root = server.config.local.maildir_root
    await trio.to_thread.run_sync(send, server.address("smtps")[1], True, "dora@example.test")
    [path] = await wait_for_mail(root, "dora")
    assert b" with UTF8SMTPSA id " in path.read_bytes()
    await trio.to_thread.run_sync(send, server.address("smtp")[1], False, "emil@example.test")
    [path] = await wait_for_mail(root, "emil")
    assert b" with UTF8SMTP id " in path.read_bytes()


@pytest.mark.parametrize("limit", ["max_connections", "max_connections_per_ip"])
async def test_smtps_over_limit_gets_421_inside_tls(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    client_context: ssl.SSLContext,
    limit: str,
) -> None:
    mta: MTA = await nursery.start(serve, make_config(limits={limit: 1}))
    holder = await RawClient.connect(*mta.address("smtp"))
    assert (await holder.reply()).startswith(b"220")
    client_context.check_hostname = False

    def refused() -> tuple[int, bytes]:
        try:
            smtplib.SMTP_SSL(
                "127.0.0.1", mta.address("smtps")[1], timeout=10, context=client_context
            )
        except smtplib.SMTPConnectError as exc:
            return exc.smtp_code, exc.smtp_error
        raise AssertionError("connected despite the limit")

    code, text = await trio.to_thread.run_sync(refused)
    assert code == 421 and text.startswith(b"4.7.0 "), (code, text)


async def test_smtps_refusal_flood_closes_without_clear_text(
    nursery: trio.Nursery, make_config: Callable[..., Config], client_context: ssl.SSLContext
) -> None:
    mta: MTA = await nursery.start(serve, make_config(limits={"max_connections_per_ip": 1}))
    holder = await RawClient.connect(*mta.address("smtp"))
    assert (await holder.reply()).startswith(b"220")
    # Every refusal handshake slot is busy (as under a flood of refused clients):
    # the next refused smtps client is closed, never sent clear text.
    slots = mta.state.refusal_handshakes
    borrowers = [object() for _ in range(int(slots.total_tokens))]
    for borrower in borrowers:
        slots.acquire_on_behalf_of_nowait(borrower)
    client_context.check_hostname = False

    def handshake() -> BaseException:
        try:
            smtplib.SMTP_SSL(
                "127.0.0.1", mta.address("smtps")[1], timeout=10, context=client_context
            )
        except (OSError, smtplib.SMTPException) as exc:
            return exc
        raise AssertionError("connected despite the limit")

    error = await trio.to_thread.run_sync(handshake)
    # A clean close: EOF or reset during the handshake, not a record of clear text.
    clean = (ssl.SSLEOFError, ConnectionResetError, smtplib.SMTPServerDisconnected)
    assert isinstance(error, clean), repr(error)
    for borrower in borrowers:
        slots.release_on_behalf_of(borrower)
