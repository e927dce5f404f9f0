"""RFC 3461 delivery status notifications on request, end to end: smtplib in, the
durable queue, aiosmtpd and Postfix's smtp-sink as next hops, DSNs into Maildir."""

from __future__ import annotations

import dataclasses
import smtplib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import trio

from trio_mta.config import Config, RelayConfig
from trio_mta.delivery.outcome import Outcome
from trio_mta.mta import MTA
from trio_mta.queue.store import NewMessage, NewRecipient, QueueStore

from .dnsserver import DnsServer
from .maildirs import new_files, wait_for_mail
from .test_client import Recorder, aiosmtpd_peer, free_port
from .test_outbound import dsn_of, port, queue_empty, start, status_fields, zone
from .test_queue_store import version_2_queue
from .test_remote import item, kinds, make_agent, smtp_sink, wait_for_port

__all__ = ["port", "zone"]  # fixtures
BODY = b"From: alice@example.test\r\nSubject: dsn\r\n\r\nthe body text\r\n"


def submit(
    server: MTA, rcpts: list[tuple[str, list[str]]], mail_options: tuple[str, ...] = ()
) -> str:
    with smtplib.SMTP(*server.address("smtp"), timeout=10) as client:
        client.ehlo("app.example.test")
        assert client.has_extn("dsn")
        assert client.mail("alice@example.test", list(mail_options))[0] == 250
        for rcpt, options in rcpts:
            assert client.rcpt(rcpt, options)[0] == 250
        code, text = client.data(BODY)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]


def mailbox(server: MTA, user: str) -> list[Path]:
    return new_files(server.config.local.maildir_root, user)


def returned_part(path: Path) -> tuple[str, str]:
    """The content type of the DSN's third part and its text."""
    part = list(dsn_of(path).iter_parts())[2]
    return part.get_content_type(), part.as_string()


async def test_notify_never_gets_no_bounce_for_a_550_at_the_next_hop(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer, port: int
) -> None:
    recorder = Recorder(
        rcpt_replies={
            "dora@remote.test": "550 5.1.1 no such user here",
            "eve@remote.test": "550 5.1.1 no such user here",
        }
    )
    with aiosmtpd_peer(recorder, "127.0.0.2", port):
        server = await start(nursery, make_config, zone, port)
        await trio.to_thread.run_sync(submit, server, [("dora@remote.test", ["NOTIFY=NEVER"])])
        await trio.to_thread.run_sync(
            submit, server, [("dora@remote.test", ["NOTIFY=NEVER"]), ("eve@remote.test", [])]
        )
        [path] = await wait_for_mail(server.config.local.maildir_root, "alice")
        await queue_empty(server)
    fields = status_fields(dsn_of(path))
    assert "Final-Recipient: rfc822; eve@remote.test" in fields  # no NOTIFY: FAILURE
    assert "dora@remote.test" not in fields
    await trio.sleep(1.5)  # the bouncer polls every second
    assert len(mailbox(server, "alice")) == 1


async def test_notify_success_gets_a_delivered_dsn_with_envid_orcpt_and_headers_only(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer, port: int
) -> None:
    server = await start(nursery, make_config, zone, port)
    await trio.to_thread.run_sync(
        lambda: submit(
            server,
            [
                ("bob@example.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;Bob+2BList@origin.test"]),
                ("carol@example.test", []),
            ],
            ("RET=HDRS", "ENVID=env+2B42"),
        )
    )
    [path] = await wait_for_mail(server.config.local.maildir_root, "alice")
    assert len(mailbox(server, "bob")) == 1 and len(mailbox(server, "carol")) == 1
    message = dsn_of(path)
    assert message["Subject"] == "Successful Mail Delivery Report"
    fields = status_fields(message)
    assert "Original-Envelope-Id: env+42" in fields
    assert "Final-Recipient: rfc822; bob@example.test" in fields
    assert "Original-Recipient: rfc822; Bob+List@origin.test" in fields
    assert "Action: delivered" in fields and "Status: 2.0.0" in fields
    assert "carol@example.test" not in fields
    content_type, text = returned_part(path)
    assert content_type == "text/rfc822-headers"
    assert "Subject: dsn" in text and "the body text" not in text
    await queue_empty(server)


async def test_notify_success_to_a_next_hop_without_dsn_is_relayed_with_the_full_message(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer, port: int
) -> None:
    recorder = Recorder()
    with aiosmtpd_peer(recorder, "127.0.0.2", port):
        server = await start(nursery, make_config, zone, port)
        await trio.to_thread.run_sync(
            lambda: submit(server, [("bob@remote.test", ["NOTIFY=SUCCESS,FAILURE"])], ("RET=FULL",))
        )
        [path] = await wait_for_mail(server.config.local.maildir_root, "alice")
        await queue_empty(server)
    assert [m.rcpt_tos for m in recorder.messages] == [["bob@remote.test"]]
    fields = status_fields(dsn_of(path))
    assert "Final-Recipient: rfc822; bob@remote.test" in fields
    assert "Action: relayed" in fields
    content_type, text = returned_part(path)
    assert content_type == "message/rfc822" and "the body text" in text


async def test_notify_delay_sends_one_delayed_dsn_after_delay_warning(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer, port: int
) -> None:
    # Nothing listens on the MX hosts: bob stays deferred.
    server = await start(nursery, make_config, zone, port, queue={"delay_warning": "1s"})
    await trio.to_thread.run_sync(
        lambda: submit(
            server,
            [("bob@remote.test", ["NOTIFY=DELAY,FAILURE"]), ("dan@remote.test", [])],
            ("ENVID=late-1",),
        )
    )
    [path] = await wait_for_mail(server.config.local.maildir_root, "alice", timeout=20)
    message = dsn_of(path)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    fields = status_fields(message)
    assert "Action: delayed" in fields and "Original-Envelope-Id: late-1" in fields
    assert "Final-Recipient: rfc822; bob@remote.test" in fields
    assert "dan@remote.test" not in fields  # no NOTIFY: failures only
    await trio.sleep(3)  # several bouncer polls and retries later: still one notice
    assert len(mailbox(server, "alice")) == 1


async def test_dsn_parameters_are_passed_on_only_to_a_next_hop_that_advertises_dsn() -> None:
    records = {
        "sink.test": [("MX", "10 sink.remote.test.")],
        "sink.remote.test": [("A", "127.0.0.4")],
    }
    for options, passed in (((), True), (("-N",), False)):
        port = free_port("127.0.0.4")
        base = item("a@sink.test")
        rcpt = dataclasses.replace(
            base.rcpt, notify=("SUCCESS", "FAILURE"), orcpt="o+1@x.test", ret="HDRS", envid="e 1"
        )
        with smtp_sink("127.0.0.4", port, *options) as dump, DnsServer(records) as dns:
            await wait_for_port("127.0.0.4", port)
            outcomes = await make_agent(dns, RelayConfig(port=port)).deliver(
                [dataclasses.replace(base, rcpt=rcpt)]
            )
            assert kinds(outcomes) == ["delivered"]
            assert outcomes[0].dsn_passed is passed
            with trio.fail_after(5):
                while not any(dump.iterdir()):
                    await trio.sleep(0.05)
            await trio.sleep(0.1)
            (capture,) = [p.read_bytes() for p in dump.iterdir()]
        if passed:
            assert b"RET=HDRS ENVID=e+201" in capture
            rcpt_args = b"<a@sink.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;o+2B1@x.test\n"
            assert b"X-Rcpt-Args: " + rcpt_args in capture
        else:
            assert b"RET=" not in capture and b"ENVID" not in capture
            assert b"X-Rcpt-Args: <a@sink.test>\n" in capture


def test_an_older_queue_gains_the_dsn_columns_and_still_bounces(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    version_2_queue(path)
    store = QueueStore(path)
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(recipients)")}
    assert {"notify", "orcpt", "notice", "warned"} <= columns
    (due,) = store.due(2e9, 10)
    assert due.notify is None and due.ret is None
    store.fail(due.rcpt_id, now=2e9, outcome=Outcome("failed", "5.0.0", "gave up"))
    (finished,) = store.bounce_candidates()
    assert [r.notify for r in finished.failed] == [None, None]  # no NOTIFY: bounced as before
    assert finished.notices == () and finished.ret is None and finished.envid is None
    store.close()


def test_a_delivered_recipient_that_asked_for_success_keeps_its_message_for_the_report(
    tmp_path: Path,
) -> None:
    store = QueueStore(tmp_path / "queue.sqlite3")
    rcpts = (
        NewRecipient("bob@example.test", "bob@example.test", "bob", notify=("SUCCESS",)),
        NewRecipient("eve@example.test", "eve@example.test", "eve"),
    )
    store.insert([("M1", NewMessage("alice@example.test", rcpts, BODY, envid="e1"))], now=1.0)
    store.mark_delivered(
        [r.rcpt_id for r in store.due(2.0, 10)],
        now=2.0,
        outcome=Outcome("delivered", "2.0.0", "ok", stage="local"),
    )
    assert store.purge_finished(keep_failed=True) == 0
    (finished,) = store.bounce_candidates()
    assert [(n.address, n.action) for n in finished.notices] == [("bob@example.test", "delivered")]
    assert finished.failed == () and finished.envid == "e1"
    store.close()
