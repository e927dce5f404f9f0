"""MaildirAgent with real files: naming, content, fsync per folder, failures, path safety."""

from __future__ import annotations

import itertools
import os
import re
import stat
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_mta.delivery.agent import DeliveryItem
from trio_mta.delivery.maildir import MaildirAgent, escape_host, safe_join
from trio_mta.queue.store import DueRecipient
from trio_mta.routing.mailmap import safe_mailbox_name

HOST = "mx.example.test"
DATA = b"Received: from a\r\nSubject: hi\r\n\r\nline one\r\nline two\r\n"
_ids = itertools.count(1)


def item(
    mailbox: str | None,
    *,
    address: str | None = None,
    sender: str = "s@example.org",
    data: bytes = DATA,
    message_id: str = "M1",
) -> DeliveryItem:
    address = address or f"{mailbox}@example.test"
    rcpt = DueRecipient(message_id, next(_ids), address, address, mailbox, sender, 0, 0.0)
    return DeliveryItem(rcpt, data)


def agent(root: Path, hostname: str = HOST) -> MaildirAgent:
    return MaildirAgent(root, hostname, limiter=trio.CapacityLimiter(4))


def files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_delivers_one_file_by_the_maildir_convention(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "mail"  # created on demand, parents too
    a = agent(root)
    [outcome] = await a.deliver([item("alice")])
    assert outcome.kind == "delivered", outcome
    [path] = files(root / "alice" / "new")
    assert re.fullmatch(rf"\d+\.M\d+P{os.getpid()}Q\d+\.mx\.example\.test", path.name)
    assert path.read_bytes() == (
        b"Return-Path: <s@example.org>\n"
        b"Delivered-To: alice@example.test\n"
        b"Received: from a\nSubject: hi\n\nline one\nline two\n"
    )
    assert files(root / "alice" / "tmp") == []
    assert (root / "alice" / "cur").is_dir()
    for folder in ("", "tmp", "new", "cur"):
        assert mode(root / "alice" / folder) == 0o700
    assert mode(path) == 0o600
    assert (a.files_synced, a.dirs_synced) == (1, 1)


async def test_batch_fsyncs_each_new_folder_once(tmp_path: Path) -> None:
    a = agent(tmp_path)
    batch = [item("alice", message_id=f"M{n}") for n in range(6)]
    batch += [item("bob", message_id=f"M{n}") for n in range(4)]
    outcomes = await a.deliver(batch)
    assert [o.kind for o in outcomes] == ["delivered"] * 10
    assert len(files(tmp_path / "alice" / "new")) == 6
    assert len(files(tmp_path / "bob" / "new")) == 4
    assert (a.files_synced, a.dirs_synced) == (10, 2)
    names = [p.name for p in files(tmp_path / "alice" / "new") + files(tmp_path / "bob" / "new")]
    assert len(set(names)) == 10


async def test_parallel_first_deliveries_to_a_new_mailbox(tmp_path: Path) -> None:
    # Regression: a thread that found tmp/ made by another could rename before new/ existed.
    for round_ in range(40):
        root = tmp_path / str(round_)
        outcomes = await agent(root).deliver([item("fresh") for _ in range(8)])
        assert [o.kind for o in outcomes] == ["delivered"] * 8, outcomes
        assert len(files(root / "fresh" / "new")) == 8


async def test_half_made_maildir_is_completed(tmp_path: Path) -> None:
    (tmp_path / "alice" / "tmp").mkdir(parents=True)  # no new/ or cur/
    [outcome] = await agent(tmp_path).deliver([item("alice")])
    assert outcome.kind == "delivered"
    assert len(files(tmp_path / "alice" / "new")) == 1
    assert (tmp_path / "alice" / "cur").is_dir()


async def test_null_sender_and_host_escaping(tmp_path: Path) -> None:
    assert escape_host("a/b:c") == "a\\057b\\072c"
    [outcome] = await agent(tmp_path, "odd/host:name").deliver([item("alice", sender="")])
    assert outcome.kind == "delivered"
    [path] = files(tmp_path / "alice" / "new")
    assert path.name.endswith(".odd\\057host\\072name")
    assert path.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: alice@example.test\n")


async def test_unwritable_mailbox_defers_and_others_still_deliver(tmp_path: Path) -> None:
    # Tests run as root, so permissions would not stop us: use real failures instead.
    (tmp_path / "blocked").write_text("a file where the mailbox folder should be")
    (tmp_path / "halfway" / "tmp").mkdir(parents=True)
    (tmp_path / "halfway" / "new").write_text("new/ is a file: rename() fails")
    outcomes = await agent(tmp_path).deliver([item("blocked"), item("halfway"), item("alice")])
    assert [o.kind for o in outcomes] == ["deferred", "deferred", "delivered"]
    assert outcomes[0].detail.startswith("4.2.0 ") and "blocked" in outcomes[0].detail
    assert outcomes[1].detail.startswith("4.2.0 ")
    assert files(tmp_path / "halfway" / "tmp") == []  # the partial file was removed
    assert len(files(tmp_path / "alice" / "new")) == 1


@pytest.mark.parametrize(
    "mailbox",
    ["../evil", "..", ".", "", "a/b", "/etc", "a\\b", "x\x00y", "bad\nname", "%2e%2e", ".hidden"],
)
async def test_mailbox_names_never_escape_root(tmp_path: Path, mailbox: str) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    [outcome] = await agent(root).deliver([item(mailbox, address="x@example.test")])
    assert outcome.kind == "failed"
    assert outcome.detail.startswith("5.3.5 ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mail"]
    assert files(root) == []
    with pytest.raises(ValueError):
        safe_join(root, mailbox)


@pytest.mark.parametrize("mailbox", ["é" * 128, "a\u2028b", "a\u2029b", "\U0010ffff"])
async def test_delivery_refuses_every_name_routing_refuses(tmp_path: Path, mailbox: str) -> None:
    # Regression: delivery had its own rule (255 characters, not octets; no U+2028/2029).
    with pytest.raises(ValueError):
        safe_mailbox_name(mailbox)
    [outcome] = await agent(tmp_path).deliver([item(mailbox, address="x@example.test")])
    assert (outcome.kind, outcome.detail[:6]) == ("failed", "5.3.5 ")
    assert files(tmp_path) == []


_PATHISH = st.text(alphabet="./\\%2efa\x00\n ~:\u2028é", max_size=130)


@given(name=st.one_of(st.text(), _PATHISH, st.text(st.characters(codec=None), max_size=20)))
def test_a_name_is_refused_or_one_folder_inside_the_root(maildir_root: Path, name: str) -> None:
    try:
        path = safe_join(maildir_root, name)
    except ValueError:
        with pytest.raises(ValueError):
            safe_mailbox_name(name)  # refused for the one rule's reason, not another
        return
    assert safe_mailbox_name(name) == name
    assert path.parent == maildir_root and path.name == name
    assert Path(name).parts == (name,)
    assert Path(os.path.realpath(path)).parent == Path(os.path.realpath(maildir_root))


@pytest.fixture(scope="module")
def maildir_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("root")


async def test_symlink_out_of_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    [outcome] = await agent(root).deliver([item("link")])
    assert outcome.kind == "failed"
    assert files(outside) == []


async def test_remote_recipient_is_not_written(tmp_path: Path) -> None:
    [outcome] = await agent(tmp_path).deliver([item(None, address="x@remote.test")])
    assert outcome.kind == "failed"
    assert files(tmp_path) == []
