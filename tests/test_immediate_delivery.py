"""Local recipients are written into Maildir before the 250; what fails falls back to the queue."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from pathlib import Path

import trio

from trio_mta.config import Config
from trio_mta.mta import MTA, serve

from .dnsserver import DnsServer
from .maildirs import new_files, wait_for_mail
from .test_client import free_port
from .test_outbound import start, submit, wait_until
from .test_outbound import zone as zone  # the loopback DNS fixture

MESSAGE = b"From: a@remote.test\r\nSubject: at once\r\n\r\nbody\r\n"


def send(server: MTA, rcpts: list[str]) -> str:
    with smtplib.SMTP(*server.address("smtp"), timeout=10) as client:
        client.ehlo("client.remote.test")
        client.mail("a@remote.test")
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(MESSAGE)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]


async def test_local_mail_is_in_new_when_250_arrives_and_never_queued(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    server: MTA = await nursery.start(serve, make_config())
    root = server.config.local.maildir_root
    seen: set[Path] = set()
    for n in range(5):
        queue_id = await trio.to_thread.run_sync(
            send, server, ["bob@example.test", "carol@example.test"]
        )
        # No waiting: the 250 means both files are already in new/.
        assert len(new_files(root, "bob")) == n + 1
        assert len(new_files(root, "carol")) == n + 1
        # The file that appeared is this message (not by mtime: two deliveries can share a
        # timestamp tick, which made this check pick the wrong file now and then).
        (arrived,) = set(new_files(root, "bob")) - seen
        seen.add(arrived)
        assert f" id {queue_id}".encode() in arrived.read_bytes()
    assert server.store is not None
    assert await trio.to_thread.run_sync(server.store.list_messages) == []
    assert server.store.stats()[0] == 0


async def test_a_mailbox_that_cannot_be_written_falls_back_to_the_queue(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    """bob's Maildir is a regular file: his copy is queued (and retried), carol's is delivered
    at once, and once the obstacle is gone the queue delivers bob's."""
    config = make_config(queue={"retry_initial": "1s", "retry_max": "1s"})
    root = config.local.maildir_root
    root.mkdir(parents=True)
    (root / "bob").write_bytes(b"not a folder")
    server: MTA = await nursery.start(serve, config)
    queue_id = await trio.to_thread.run_sync(
        send, server, ["bob@example.test", "carol@example.test"]
    )
    assert len(new_files(root, "carol")) == 1
    assert server.store is not None
    store = server.store
    rows = await trio.to_thread.run_sync(store.list_messages)
    assert [row.id for row in rows] == [queue_id]
    assert [r.address for r in rows[0].recipients] == ["bob@example.test"]
    (root / "bob").unlink()
    await wait_for_mail(root, "bob")
    await wait_until(lambda: store.stats()[0] == 0)
    assert len(new_files(root, "carol")) == 1, "carol got exactly one copy"


async def test_mixed_message_delivers_the_local_part_and_queues_the_rest(
    nursery: trio.Nursery, make_config: Callable[..., Config], zone: DnsServer
) -> None:
    port = free_port("127.0.0.2")  # nothing listens there: the remote part stays queued
    server = await start(
        nursery, make_config, zone, port, queue={"retry_initial": "1h", "retry_max": "1h"}
    )
    queue_id = await trio.to_thread.run_sync(
        lambda: submit(server, ["bob@example.test", "dave@remote.test"])
    )
    root = server.config.local.maildir_root
    assert len(new_files(root, "bob")) == 1
    assert server.store is not None
    rows = await trio.to_thread.run_sync(server.store.list_messages)
    assert [row.id for row in rows] == [queue_id]
    assert [r.address for r in rows[0].recipients] == ["dave@remote.test"]


async def test_the_queue_path_still_works_when_immediate_delivery_is_off(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    server: MTA = await nursery.start(
        serve, make_config(local={"domains": ["example.test"], "deliver_at_once": False})
    )
    await trio.to_thread.run_sync(send, server, ["bob@example.test"])
    await wait_for_mail(server.config.local.maildir_root, "bob")
