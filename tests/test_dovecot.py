"""trio_mta and a real, private Dovecot: LMTP delivery, and a Maildir shared by group.

Mail is read back the way a user would, over IMAP with imaplib, logged in as
the passwd-file user (tests/dovecot_instance.py).
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from trio_mta.config import Config
from trio_mta.mta import MTA, serve
from trio_mta.queue.store import RecipientState

from .dovecot_instance import NOBODY, PASSWORD, DovecotInstance, mail_gid, unavailable
from .test_outbound import status_fields, submit, wait_until

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

BODY = b"From: alice@example.test\r\nSubject: over lmtp\r\n\r\nhello dovecot\r\n"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A temp directory uid nobody may traverse (tmp_path's parents are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="trio-mta-dovecot-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dovecot(tmp_path: Path, shared_dir: Path) -> Iterator[DovecotInstance]:
    mail_root = shared_dir / "mail"
    mail_root.mkdir()
    os.chown(mail_root, NOBODY, mail_gid())  # Dovecot writes LMTP deliveries as nobody
    instance = DovecotInstance(tmp_path / "dovecot", mail_root, ("alice", "bob"))
    instance.write_config()
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def inbox(dovecot: DovecotInstance, user: str) -> list[email.message.EmailMessage]:
    """Every message in ``user``'s INBOX, fetched over IMAP."""
    with imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=10) as imap:
        imap.login(user, PASSWORD)
        imap.select("INBOX")  # not EXAMINE: Dovecot then moves new/ to cur/
        _, found = imap.search(None, "ALL")
        messages = []
        for number in found[0].split():
            _, data = imap.fetch(number, "(RFC822)")
            raw = data[0]
            assert isinstance(raw, tuple)
            parsed = email.message_from_bytes(raw[1], policy=email.policy.default)
            assert isinstance(parsed, email.message.EmailMessage)
            messages.append(parsed)
        return messages


async def wait_for_inbox(
    dovecot: DovecotInstance, user: str, count: int = 1
) -> list[email.message.EmailMessage]:
    with trio.fail_after(20):
        while True:
            messages = await trio.to_thread.run_sync(inbox, dovecot, user)
            if len(messages) >= count:
                return messages
            await trio.sleep(0.1)


async def recipient(server: MTA, queue_id: str, address: str) -> RecipientState:
    assert server.store is not None
    shown = await trio.to_thread.run_sync(server.store.show, queue_id)
    assert shown is not None
    (state,) = [r for r in shown.recipients if r.address == address]
    return state


def lmtp_config(make_config: Callable[..., Config], target: str, **local: object) -> Config:
    return make_config(
        local={"domains": ["example.test"], "lmtp": target, **local},
        queue={"retry_initial": "1s", "retry_max": "1s"},
    )


async def test_local_mail_goes_over_lmtp_into_dovecot_and_reads_back_over_imap(
    nursery: trio.Nursery, make_config: Callable[..., Config], dovecot: DovecotInstance
) -> None:
    config = lmtp_config(make_config, dovecot.lmtp_target)
    assert config.local.deliver_at_once  # ignored with lmtp: the queue hands mail to Dovecot
    server: MTA = await nursery.start(serve, config)
    queue_id = await trio.to_thread.run_sync(
        lambda: submit(server, ["bob@example.test", "ghost@example.test"], body=BODY)
    )
    (message,) = await wait_for_inbox(dovecot, "bob")
    assert message["Subject"] == "over lmtp"
    assert message["Delivered-To"] == "bob@example.test"
    assert message.get_content().strip() == "hello dovecot"
    assert any(f"id {queue_id}" in trace for trace in message.get_all("Received", []))
    # Nothing went to trio_mta's own Maildir.
    assert not config.local.maildir_root.exists() or not any(config.local.maildir_root.iterdir())
    # ghost is unknown to Dovecot: 550 at RCPT, failed and bounced to alice, over LMTP too
    # (the message is purged once finished, so the DSN is where the outcome shows).
    (dsn,) = await wait_for_inbox(dovecot, "alice")
    assert dsn.get_content_type() == "multipart/report"
    fields = status_fields(dsn)
    assert "Final-Recipient: rfc822; ghost@example.test" in fields
    assert "Action: failed" in fields and "Status: 5.1.1" in fields
    assert "550 5.1.1" in fields and "bob@example.test" not in fields
    await wait_until(lambda: server.store is not None and server.store.stats()[0] == 0)


async def test_lmtp_over_a_unix_socket(
    nursery: trio.Nursery, make_config: Callable[..., Config], dovecot: DovecotInstance
) -> None:
    socket_path = dovecot.root / "run" / "lmtp"
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    server: MTA = await nursery.start(serve, lmtp_config(make_config, f"unix:{socket_path}"))
    await trio.to_thread.run_sync(lambda: submit(server, ["alice@example.test"], body=BODY))
    (message,) = await wait_for_inbox(dovecot, "alice")
    assert message["Subject"] == "over lmtp"


async def test_dovecot_down_defers_and_the_retry_delivers(
    nursery: trio.Nursery, make_config: Callable[..., Config], dovecot: DovecotInstance
) -> None:
    await trio.to_thread.run_sync(dovecot.stop)
    server: MTA = await nursery.start(serve, lmtp_config(make_config, dovecot.lmtp_target))
    queue_id = await trio.to_thread.run_sync(
        lambda: submit(server, ["bob@example.test"], body=BODY)
    )
    assert server.store is not None
    store = server.store

    def tried() -> bool:
        shown = store.show(queue_id)
        return shown is not None and shown.recipients[0].attempts >= 1

    await wait_until(tried)
    bob = await recipient(server, queue_id, "bob@example.test")
    assert bob.status == "deferred" and bob.last is not None
    assert (bob.last.status, bob.last.stage) == ("4.4.1", "connect")
    assert "refused" in bob.last.text.lower()
    await trio.to_thread.run_sync(dovecot.start)
    (message,) = await wait_for_inbox(dovecot, "bob")
    assert message["Subject"] == "over lmtp"
    await wait_until(lambda: store.stats()[0] == 0)


async def test_maildir_shared_by_group_is_readable_by_dovecot_as_another_user(
    nursery: trio.Nursery, make_config: Callable[..., Config], tmp_path: Path, shared_dir: Path
) -> None:
    """trio_mta (root here) writes with maildir_group = "mail"; Dovecot reads as nobody:mail."""
    mail_root = shared_dir / "shared-mail"
    config = make_config(
        local={"domains": ["example.test"], "maildir_root": str(mail_root), "maildir_group": "mail"}
    )
    server: MTA = await nursery.start(serve, config)
    await trio.to_thread.run_sync(lambda: submit(server, ["alice@example.test"], body=BODY))
    gid = mail_gid()
    for folder in (mail_root, mail_root / "alice", mail_root / "alice" / "new"):
        info = folder.stat()
        assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (gid, 0o2770), folder
    (file,) = (mail_root / "alice" / "new").iterdir()
    assert (file.stat().st_gid, stat.S_IMODE(file.stat().st_mode)) == (gid, 0o660)
    instance = DovecotInstance(tmp_path / "dovecot", mail_root, ("alice",))
    instance.write_config()
    await trio.to_thread.run_sync(instance.start)
    try:
        (message,) = await wait_for_inbox(instance, "alice")
        assert message["Subject"] == "over lmtp"
        # Dovecot (nobody, group mail) moved it to cur/: it could write the folders too.
        assert not any((mail_root / "alice" / "new").iterdir())
        assert any((mail_root / "alice" / "cur").iterdir())
    finally:
        await trio.to_thread.run_sync(instance.stop)


async def test_per_recipient_replies_after_the_data_decide_each_recipient(
    nursery: trio.Nursery, make_config: Callable[..., Config], tmp_path: Path, shared_dir: Path
) -> None:
    """One transaction, two accepted recipients: Dovecot saves alice's copy and answers
    452 4.2.2 (over quota) for bob's after the data; only bob's is deferred and retried."""
    mail_root = shared_dir / "mail"
    mail_root.mkdir()
    os.chown(mail_root, NOBODY, mail_gid())
    instance = DovecotInstance(
        tmp_path / "dovecot", mail_root, ("alice", "bob"), tiny_quota=("bob",)
    )
    instance.write_config()
    await trio.to_thread.run_sync(instance.start)
    try:
        server: MTA = await nursery.start(serve, lmtp_config(make_config, instance.lmtp_target))
        big = BODY + b"x" * 2048 + b"\r\n"  # over bob's 1 KiB quota
        queue_id = await trio.to_thread.run_sync(
            lambda: submit(server, ["alice@example.test", "bob@example.test"], body=big)
        )
        (message,) = await wait_for_inbox(instance, "alice")
        assert message["Subject"] == "over lmtp"
        assert server.store is not None
        store = server.store

        def bob_tried() -> bool:
            shown = store.show(queue_id)
            return shown is not None and any(
                r.address == "bob@example.test" and r.attempts >= 1 for r in shown.recipients
            )

        await wait_until(bob_tried)
        bob = await recipient(server, queue_id, "bob@example.test")
        assert bob.status == "deferred" and bob.last is not None
        assert (bob.last.code, bob.last.status, bob.last.stage) == (452, "4.2.2", "data")
        alice = await recipient(server, queue_id, "alice@example.test")
        assert alice.status == "delivered"
        assert await trio.to_thread.run_sync(inbox, instance, "bob") == []
    finally:
        await trio.to_thread.run_sync(instance.stop)
