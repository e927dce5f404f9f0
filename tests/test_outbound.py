"""Relaying end to end: SMTP in, durable queue, MX lookup on a loopback DNS server,
delivery to aiosmtpd MX hosts on 127.0.0.2/.3, retries, and DSNs back to the sender."""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trustme

from trio_mta.config import Config
from trio_mta.mta import MTA, serve

from .dnsserver import DnsServer
from .maildirs import new_files, wait_for_mail
from .proc import run_cli
from .test_client import Recorder, aiosmtpd_peer, free_port, server_tls

BODY = b"From: alice@example.test\r\nSubject: outbound\r\n\r\nhello there\r\n"


@pytest.fixture
def zone() -> Iterator[DnsServer]:
    dns = DnsServer(
        {
            "remote.test.": [("MX", "10 mx1.remote.test."), ("MX", "20 mx2.remote.test.")],
            "mx1.remote.test.": [("A", "127.0.0.2")],
            "mx2.remote.test.": [("A", "127.0.0.3")],
            "other.test.": [("MX", "10 mx1.remote.test.")],
            "third.test.": [("MX", "10 mx1.remote.test.")],
            "nullmx.test.": [("MX", "0 .")],
            "bare.test.": [("A", "127.0.0.3")],
        }
    )
    with dns:
        yield dns


@pytest.fixture
def port() -> int:
    return free_port("127.0.0.2")


async def start(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    zone: DnsServer,
    port: int,
    **sections: object,
) -> MTA:
    relay = {"port": port, "tls": "opportunistic"}
    relay.update(sections.pop("relay", {}))  # type: ignore[arg-type]
    queue = {"retry_initial": "1s", "retry_max": "1s"}
    queue.update(sections.pop("queue", {}))  # type: ignore[arg-type]
    config = make_config(
        dns={"nameservers": ["{}:{}".format(*zone.address)]}, relay=relay, queue=queue, **sections
    )
    server: MTA = await nursery.start(serve, config)
    return server


def submit(
    server: MTA, rcpts: list[str], sender: str = "alice@example.test", body: bytes = BODY
) -> str:
    with smtplib.SMTP(*server.address("smtp"), timeout=10) as client:
        client.ehlo("app.example.test")
        client.mail(sender)
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(body)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]


async def wait_until(predicate: Callable[[], bool], timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def queue_empty(server: MTA) -> None:
    assert server.store is not None
    store = server.store
    with trio.fail_after(15):
        while await trio.to_thread.run_sync(store.list_messages):
            await trio.sleep(0.05)


def dsn_of(path: Path) -> email.message.EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    return message


def status_fields(message: email.message.EmailMessage) -> str:
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            return "".join(str(block) for block in part.get_payload())  # type: ignore[union-attr]
    raise AssertionError("no message/delivery-status part")


async def test_relayed_over_starttls(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    zone: DnsServer,
    port: int,
    ca: trustme.CA,
) -> None:
    recorder = Recorder()
    with aiosmtpd_peer(recorder, "127.0.0.2", port, tls_context=server_tls(ca, "mx1.remote.test")):
        server = await start(nursery, make_config, zone, port)
        queue_id = await trio.to_thread.run_sync(submit, server, ["bob@remote.test"])
        await wait_until(lambda: len(recorder.messages) == 1)
        await queue_empty(server)
    [got] = recorder.messages
    assert got.tls and got.rcpt_tos == ["bob@remote.test"]
    assert got.mail_from == "alice@example.test"
    assert f"id {queue_id}".encode() in got.content
    assert b"hello there" in got.content


async def test_first_mx_down_second_receives(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer, port: int
) -> None:
    recorder = Recorder()
    with aiosmtpd_peer(recorder, "127.0.0.3", port):  # nothing listens on 127.0.0.2
        server = await start(nursery, make_config, zone, port)
        await trio.to_thread.run_sync(submit, server, ["bob@remote.test"])
        await wait_until(lambda: len(recorder.messages) == 1)
    assert recorder.messages[0].rcpt_tos == ["bob@remote.test"]


async def test_no_mx_uses_the_address_record(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer, port: int
) -> None:
    recorder = Recorder()
    with aiosmtpd_peer(recorder, "127.0.0.3", port):
        server = await start(nursery, make_config, zone, port)
        await trio.to_thread.run_sync(submit, server, ["carl@bare.test"])
        await wait_until(lambda: len(recorder.messages) == 1)
    assert recorder.messages[0].rcpt_tos == ["carl@bare.test"]


async def test_null_mx_bounces_into_the_senders_maildir(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer, port: int
) -> None:
    server = await start(nursery, make_config, zone, port)
    queue_id = await trio.to_thread.run_sync(submit, server, ["nobody@nullmx.test"])
    [path] = await wait_for_mail(server.config.local.maildir_root, "alice")
    dsn = dsn_of(path)
    assert path.read_bytes().startswith(b"Return-Path: <>\n")
    fields = status_fields(dsn)
    assert "Final-Recipient: rfc822; nobody@nullmx.test" in fields
    assert "Status: 5.1.10" in fields and "Action: failed" in fields
    assert queue_id in path.read_text()
    await queue_empty(server)


async def test_temporary_failure_retries_then_delivers(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    zone: DnsServer,
    port: int,
    tmp_path: Path,
) -> None:
    recorder = Recorder(rcpt_replies={"bob@remote.test": "451 4.3.0 try again later"})
    with (
        aiosmtpd_peer(recorder, "127.0.0.2", port),
        aiosmtpd_peer(
            Recorder(rcpt_replies={"bob@remote.test": "451 4.3.0 try again later"}),
            "127.0.0.3",
            port,
        ),
    ):
        server = await start(
            nursery, make_config, zone, port, queue={"retry_initial": "2s", "retry_max": "2s"}
        )
        queue_id = await trio.to_thread.run_sync(submit, server, ["bob@remote.test"])
        # In between, the real CLI shows it deferred with the remote's words.
        cli_config = tmp_path / "cli.toml"
        cli_config.write_text(
            f'state_dir = "{server.config.state_dir}"\n[local]\ndomains = ["example.test"]\n'
        )

        def deferred() -> dict[str, object] | None:
            listed = run_cli("queue", "list", "--json", "--config", str(cli_config))
            assert listed.returncode == 0, listed.stderr
            rows = json.loads(listed.stdout)
            rcpt = rows[0]["recipients"][0] if rows else None
            return rcpt if rcpt and rcpt["status"] == "deferred" else None

        with trio.fail_after(10):
            while (rcpt := await trio.to_thread.run_sync(deferred)) is None:
                await trio.sleep(0.1)
        assert rcpt["address"] == "bob@remote.test"
        assert "451 4.3.0 try again later" in str(rcpt["last_error"])
        assert rcpt["next_attempt"] and int(str(rcpt["attempts"])) >= 1
        recorder.rcpt_replies.clear()  # the far side's bad day is over
        await wait_until(lambda: len(recorder.messages) == 1)
        await queue_empty(server)
    assert recorder.messages[0].rcpt_tos == ["bob@remote.test"]
    assert queue_id


async def test_one_permanent_failure_among_three_domains_one_dsn(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer, port: int
) -> None:
    recorder = Recorder(rcpt_replies={"dora@other.test": "550 5.1.1 no such user here"})
    with aiosmtpd_peer(recorder, "127.0.0.2", port):
        server = await start(nursery, make_config, zone, port)
        await trio.to_thread.run_sync(
            submit, server, ["bob@remote.test", "dora@other.test", "ed@third.test"]
        )
        [path] = await wait_for_mail(server.config.local.maildir_root, "alice")
        await queue_empty(server)
    delivered = sorted(r for m in recorder.messages for r in m.rcpt_tos)
    assert delivered == ["bob@remote.test", "ed@third.test"]
    fields = status_fields(dsn_of(path))
    assert "Final-Recipient: rfc822; dora@other.test" in fields
    assert "bob@remote.test" not in fields and "ed@third.test" not in fields
    assert "Status: 5.1.1" in fields and "550 5.1.1 no such user here" in fields
    assert "Remote-MTA: dns; mx1.remote.test" in fields
    await trio.sleep(0.5)
    assert len(new_files(server.config.local.maildir_root, "alice")) == 1


async def test_expiry_bounces_and_null_sender_never_bounces(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer, port: int
) -> None:
    # Nothing listens on the MX hosts: every attempt is a connection failure.
    server = await start(nursery, make_config, zone, port, queue={"max_age": "3s"})
    await trio.to_thread.run_sync(submit, server, ["bob@remote.test"])
    await trio.to_thread.run_sync(lambda: submit(server, ["bob@remote.test"], sender=""))
    [path] = await wait_for_mail(server.config.local.maildir_root, "alice", timeout=20)
    fields = status_fields(dsn_of(path))
    assert "Status: 4.4.7" in fields and "Action: failed" in fields
    # The diagnostic names each MX host tried, with its own cause.
    diagnostic = " ".join(fields.split())
    assert "Diagnostic-Code: X-trio-mta; message expired after" in diagnostic
    assert (
        f"mx1.remote.test [127.0.0.2]:{port}: Connection refused; "
        f"mx2.remote.test [127.0.0.3]:{port}: Connection refused"
    ) in diagnostic
    await queue_empty(server)  # the <> message expired too, without a bounce
    await trio.sleep(0.5)
    assert len(new_files(server.config.local.maildir_root, "alice")) == 1
    assert new_files(server.config.local.maildir_root, "postmaster") == []


async def test_required_tls_keeps_mail_deferred(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer, port: int
) -> None:
    recorder = Recorder()
    with aiosmtpd_peer(recorder, "127.0.0.2", port), aiosmtpd_peer(recorder, "127.0.0.3", port):
        server = await start(nursery, make_config, zone, port, relay={"tls": "required"})
        await trio.to_thread.run_sync(submit, server, ["bob@remote.test"])
        assert server.store is not None
        store = server.store

        def status() -> str | None:
            rows = store.list_messages()
            return rows[0].recipients[0].status if rows else None

        await wait_until(lambda: status() == "deferred")
    assert recorder.messages == []


def cli_config_for(server: MTA, tmp_path: Path) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(
        f'state_dir = "{server.config.state_dir}"\n[local]\ndomains = ["example.test"]\n'
    )
    return path


async def test_queue_list_and_show_name_each_unreachable_hosts_cause(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    zone: DnsServer,
    port: int,
    tmp_path: Path,
) -> None:
    """Both MX hosts refuse connections: the deferral names each, with its cause."""
    server = await start(
        nursery, make_config, zone, port, queue={"retry_initial": "1h", "retry_max": "1h"}
    )
    queue_id = await trio.to_thread.run_sync(submit, server, ["bob@remote.test"])
    assert server.store is not None
    store = server.store

    def deferred() -> bool:
        rows = store.list_messages()
        return bool(rows) and rows[0].recipients[0].status == "deferred"

    await wait_until(deferred)
    cli = cli_config_for(server, tmp_path)
    expected = (
        f"mx1.remote.test [127.0.0.2]:{port}: Connection refused; "
        f"mx2.remote.test [127.0.0.3]:{port}: Connection refused"
    )
    listed = await trio.to_thread.run_sync(lambda: run_cli("queue", "list", "--config", str(cli)))
    assert listed.returncode == 0, listed.stderr
    assert expected in listed.stdout
    shown = await trio.to_thread.run_sync(
        lambda: run_cli("queue", "show", queue_id, "--config", str(cli))
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count(expected) == 2  # the last error and the attempt's history
    (row,) = json.loads(
        (
            await trio.to_thread.run_sync(
                lambda: run_cli("queue", "list", "--json", "--config", str(cli))
            )
        ).stdout
    )
    assert row["recipients"][0]["last_error"] == f"4.4.1 {expected}"


async def test_long_lines_are_made_to_fit_for_a_next_hop_that_refuses_them(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer, port: int
) -> None:
    """aiosmtpd answers "500 Line too long" to a line over 998 octets: it used to bounce."""
    recorder = Recorder()
    subject = " ".join(f"word{n}" for n in range(400))  # ~3400 octets, foldable
    text = ("é" * 2000 + "\r\nshort line\r\n" + "z" * 5000 + "\r\n").encode()
    body = (
        f"From: alice@example.test\r\nSubject: {subject}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        "\r\n"
    ).encode() + text
    with aiosmtpd_peer(recorder, "127.0.0.2", port):
        server = await start(nursery, make_config, zone, port)
        await trio.to_thread.run_sync(lambda: submit(server, ["bob@remote.test"], body=body))
        await wait_until(lambda: len(recorder.messages) == 1)
        await queue_empty(server)
    received = recorder.messages[0].content
    assert max(len(line) for line in received.split(b"\r\n")) <= 998
    message = email.message_from_bytes(received, policy=email.policy.default)
    assert " ".join(str(message["Subject"]).split()) == subject
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_payload(decode=True) == text
    assert new_files(server.config.local.maildir_root, "alice") == []  # no bounce
