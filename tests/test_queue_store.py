"""QueueStore: durable insert, leasing, outcomes, the `queue` commands' views; queue IDs."""

from __future__ import annotations

import json
import re
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.outcomes import o
from trio_mta.queue.bodies import SpooledBody, crc_of
from trio_mta.queue.ids import host_tag_for, is_queue_id, new_queue_id
from trio_mta.queue.report import format_list, format_show, message_json
from trio_mta.queue.store import (
    NewMessage,
    NewRecipient,
    QueueError,
    QueueStore,
    RecipientUpdate,
)

NOW = 1_800_000_000.0
DATA = b"Received: from client\r\nSubject: hello\r\n\r\nbody line\r\n"


def local(name: str, domain: str = "example.test") -> NewRecipient:
    return NewRecipient(f"{name}@{domain}", f"{name}@{domain}", name)


def remote(address: str) -> NewRecipient:
    return NewRecipient(address, address, None)


def message(*rcpts: NewRecipient, sender: str = "s@example.org", data: bytes = DATA) -> NewMessage:
    return NewMessage(sender, rcpts, data, {"client": "192.0.2.1", "helo": "client.test"})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    s = QueueStore(tmp_path / "state" / "queue.sqlite3")
    yield s
    s.close()


# -- queue IDs ---------------------------------------------------------------------


def test_queue_ids_are_unique_sorted_and_safe() -> None:
    tag = host_tag_for("mx1.example.org")
    ids = [new_queue_id(tag) for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for qid in ids[:50]:
        assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{12}-[0-9A-Z]{4}", qid)
        assert is_queue_id(qid)
    assert not is_queue_id("../etc/passwd")


def test_host_tag_is_stable_and_differs_between_hosts() -> None:
    assert host_tag_for("MX1.example.org") == host_tag_for("mx1.example.org")
    assert host_tag_for("mx1.example.org") != host_tag_for("mx2.example.org")
    assert new_queue_id("AB12").endswith("-AB12")
    with pytest.raises(ValueError):
        new_queue_id("a/b")


# -- insert / due / leases -----------------------------------------------------------


def test_insert_is_visible_to_a_separate_connection_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    store = QueueStore(path)
    store.insert([("ID1", message(local("alice"), remote("bob@remote.test")))], now=NOW)
    # Another process (the CLI) reads through its own connection while the server runs.
    other = QueueStore(path, readonly=True)
    assert [row.id for row in other.list_messages()] == ["ID1"]
    other.close()
    store.close()
    reopened = QueueStore(path)
    assert reopened.data("ID1") == DATA
    (mode,) = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reopened.close()


def test_insert_is_one_durable_transaction_per_batch(store: QueueStore) -> None:
    batch = [(f"ID{i}", message(local("alice"))) for i in range(20)]
    store.insert(batch, now=NOW)
    assert store.durable_commits == 1
    assert len(store.list_messages()) == 20


def test_failed_insert_stores_nothing(store: QueueStore) -> None:
    store.insert([("DUP", message(local("alice")))], now=NOW)
    with pytest.raises(QueueError):
        store.insert([("NEW", message(local("bob"))), ("DUP", message(local("carol")))], now=NOW)
    assert [row.id for row in store.list_messages()] == ["DUP"]


def test_due_returns_fields_filters_by_kind_and_leases(store: QueueStore) -> None:
    store.insert([("M1", message(local("alice"), remote("bob@remote.test")))], now=NOW)
    assert store.due(NOW - 1, 10) == []  # not due before it was received
    (lr,) = store.due(NOW, 10, local=True)
    assert (lr.message_id, lr.address, lr.mailbox, lr.sender, lr.attempts, lr.received_at) == (
        "M1",
        "alice@example.test",
        "alice",
        "s@example.org",
        0,
        NOW,
    )
    # Leased: not handed out again, neither by kind nor unfiltered.
    assert store.due(NOW, 10, local=True) == []
    (rr,) = store.due(NOW, 10)
    assert rr.mailbox is None and rr.address == "bob@remote.test"
    assert store.due(NOW, 10) == []
    assert store.next_due() is None
    store.release([lr.rcpt_id, rr.rcpt_id])
    assert {r.rcpt_id for r in store.due(NOW, 10)} == {lr.rcpt_id, rr.rcpt_id}


def test_due_respects_limit_and_order(store: QueueStore) -> None:
    store.insert([(f"M{i}", message(local("alice"))) for i in range(5)], now=NOW)
    first = store.due(NOW, 2)
    second = store.due(NOW, 10)
    assert len(first) == 2 and len(second) == 3
    assert {r.rcpt_id for r in first}.isdisjoint(r.rcpt_id for r in second)


def test_bodies_are_read_once_per_message(store: QueueStore) -> None:
    store.insert([("A", message(local("x"), local("y"))), ("B", message(local("z")))], now=NOW)
    bodies = store.data_many(["A", "A", "B", "GONE"])
    assert bodies == {"A": DATA, "B": DATA}
    with pytest.raises(KeyError):
        store.data("GONE")


# -- outcomes ------------------------------------------------------------------------


def test_defer_records_error_attempt_and_next_time(store: QueueStore) -> None:
    store.insert([("M1", message(remote("bob@remote.test")))], now=NOW)
    (r,) = store.due(NOW, 10)
    store.defer(
        r.rcpt_id, now=NOW + 5, next_attempt=NOW + 600, outcome=o("deferred", "451 4.3.0 try later")
    )
    assert store.due(NOW + 599, 10) == []
    assert store.next_due() == NOW + 600
    (again,) = store.due(NOW + 600, 10)
    assert again.attempts == 1
    (row,) = store.list_messages()
    assert message_json(row)["recipients"] == [
        {
            "address": "bob@remote.test",
            "status": "deferred",
            "attempts": 1,
            "next_attempt": "2027-01-15T08:10:00Z",
            "last_error": "451 4.3.0 try later",
        }
    ]


def test_list_json_shape_is_spec_8(store: QueueStore) -> None:
    store.insert([("M1", message(local("alice"), remote("bob@remote.test")))], now=NOW)
    rows = store.list_messages()
    assert json.loads(format_list(rows, json_output=True)) == [
        {
            "id": "M1",
            "sender": "s@example.org",
            "received_at": "2027-01-15T08:00:00Z",
            "size": len(DATA),
            "recipients": [
                {
                    "address": "alice@example.test",
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt": "2027-01-15T08:00:00Z",
                    "last_error": None,
                },
                {
                    "address": "bob@remote.test",
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt": "2027-01-15T08:00:00Z",
                    "last_error": None,
                },
            ],
        }
    ]


def test_fully_delivered_message_is_purged_at_once(store: QueueStore) -> None:
    store.insert([("M1", message(local("a"), local("b"))), ("M2", message(local("c")))], now=NOW)
    rcpts = {r.address: r.rcpt_id for r in store.due(NOW, 10)}
    store.mark_delivered([rcpts["a@example.test"]], now=NOW, outcome=o("delivered", "2.0.0 ok"))
    (row,) = [r for r in store.list_messages() if r.id == "M1"]
    assert [(r.status, r.next_attempt) for r in row.recipients] == [
        ("delivered", None),
        ("pending", NOW),
    ]
    store.mark_delivered(
        [rcpts["b@example.test"], rcpts["c@example.test"]],
        now=NOW,
        outcome=o("delivered", "2.0.0 ok"),
    )
    assert store.list_messages() == []
    assert store.show("M1") is None
    assert store.data_many(["M1", "M2"]) == {}


def test_failed_recipients_stay_until_purged(store: QueueStore) -> None:
    store.insert([("M1", message(local("a"), remote("x@remote.test")))], now=NOW)
    rcpts = {r.address: r.rcpt_id for r in store.due(NOW, 10)}
    store.update(
        [
            RecipientUpdate(rcpts["a@example.test"], o("delivered", "2.0.0 ok")),
            RecipientUpdate(rcpts["x@remote.test"], o("failed", "550 5.1.1 no such user")),
        ],
        now=NOW + 1,
    )
    assert store.list_messages() == []  # every recipient is delivered or failed
    info = store.show("M1")
    assert info is not None
    assert [r.status for r in info.recipients] == ["delivered", "failed"]
    assert store.purge_finished(keep_failed=True) == 0
    assert store.purge_finished() == 1
    assert store.show("M1") is None


def test_update_releases_leases_and_ignores_deleted_messages(store: QueueStore) -> None:
    store.insert([("M1", message(local("a"))), ("M2", message(local("b")))], now=NOW)
    due = {r.message_id: r for r in store.due(NOW, 10)}
    assert store.leased == 2
    assert store.delete("M2")
    store.update(
        [
            RecipientUpdate(due["M1"].rcpt_id, o("deferred", "4.2.0 busy"), NOW + 1),
            RecipientUpdate(due["M2"].rcpt_id, o("delivered", "2.0.0 ok")),
        ],
        now=NOW,
    )
    assert store.leased == 0
    assert [r.message_id for r in store.due(NOW + 1, 10)] == ["M1"]
    with pytest.raises(ValueError):
        store.update([RecipientUpdate(due["M1"].rcpt_id, o("deferred", "x"))], now=NOW)


def test_failed_update_keeps_the_leases(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "q.sqlite3", busy_timeout=0.05)
    store.insert([("M1", message(local("a")))], now=NOW)
    (r,) = store.due(NOW, 10)
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(QueueError):
        store.mark_delivered([r.rcpt_id], now=NOW, outcome=o("delivered", "2.0.0 ok"))
    # Still leased: handing it out again would deliver it twice.
    assert store.due(NOW, 10) == []
    blocker.execute("ROLLBACK")
    blocker.close()
    store.mark_delivered([r.rcpt_id], now=NOW, outcome=o("delivered", "2.0.0 ok"))
    assert store.leased == 0
    store.close()


# -- administration ----------------------------------------------------------------


def test_flush_makes_deferred_due_now(store: QueueStore) -> None:
    store.insert([("M1", message(local("a"))), ("M2", message(remote("b@remote.test")))], now=NOW)
    for r in store.due(NOW, 10):
        store.defer(
            r.rcpt_id, now=NOW, next_attempt=NOW + 3600, outcome=o("deferred", "4.4.1 no answer")
        )
    assert store.due(NOW + 10, 10) == []
    assert store.flush("M1", now=NOW + 10) == 1
    assert [r.message_id for r in store.due(NOW + 10, 10)] == ["M1"]
    assert store.flush(now=NOW + 20, local=False) == 1
    assert [r.message_id for r in store.due(NOW + 20, 10)] == ["M2"]
    assert store.flush("NOPE", now=NOW) == 0


def test_flush_from_another_connection_is_seen(tmp_path: Path, store: QueueStore) -> None:
    store.insert([("M1", message(local("a")))], now=NOW)
    (r,) = store.due(NOW, 10)
    store.defer(r.rcpt_id, now=NOW, next_attempt=NOW + 3600, outcome=o("deferred", "4.2.0 locked"))
    cli = QueueStore(store.path)
    assert cli.flush(now=NOW + 1) == 1
    cli.close()
    assert store.next_due() == NOW + 1
    assert len(store.due(NOW + 1, 10)) == 1


def test_delete(store: QueueStore) -> None:
    store.insert([("M1", message(local("a")))], now=NOW)
    assert store.delete("M1") is True
    assert store.delete("M1") is False
    assert store.list_messages() == []
    assert store.due(NOW, 10) == []


def test_show_has_envelope_history_and_headers(store: QueueStore) -> None:
    store.insert(
        [("M1", message(NewRecipient("alice@example.test", "postmaster@example.test", "alice")))],
        now=NOW,
    )
    (r,) = store.due(NOW, 10)
    store.defer(
        r.rcpt_id, now=NOW + 1, next_attempt=NOW + 60, outcome=o("deferred", "4.2.0 mailbox busy")
    )
    info = store.show("M1")
    assert info is not None
    assert info.sender == "s@example.org"
    assert info.meta == {"client": "192.0.2.1", "helo": "client.test"}
    assert info.headers == "Received: from client\nSubject: hello\n"
    (rcpt,) = info.recipients
    assert rcpt.original == "postmaster@example.test"
    assert rcpt.mailbox == "alice"
    assert [(a.at, a.outcome, a.detail) for a in rcpt.history] == [
        (NOW + 1, o("deferred", "4.2.0 mailbox busy"), "4.2.0 mailbox busy")
    ]
    assert store.show("NOPE") is None


def test_readonly_store_refuses_writes_and_missing_database(tmp_path: Path) -> None:
    with pytest.raises(QueueError):
        QueueStore(tmp_path / "absent.sqlite3", readonly=True)
    QueueStore(tmp_path / "q.sqlite3").close()
    ro = QueueStore(tmp_path / "q.sqlite3", readonly=True)
    with pytest.raises(QueueError):
        ro.insert([("M1", message(local("a")))], now=NOW)
    assert ro.list_messages() == []
    ro.close()


def test_locked_database_is_a_queue_error(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = QueueStore(path, busy_timeout=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(QueueError, match="locked"):
        store.insert([("M1", message(local("a")))], now=NOW)
    blocker.execute("ROLLBACK")
    store.insert([("M1", message(local("a")))], now=NOW)
    assert len(store.list_messages()) == 1
    blocker.close()
    store.close()


# -- `queue list` / `queue show` rendering ------------------------------------------------


def test_format_list_json_is_one_object_per_message(store: QueueStore) -> None:
    store.insert([("M1", message(local("alice")))], now=NOW)
    rows = store.list_messages()
    assert json.loads(format_list(rows, json_output=True)) == [message_json(r) for r in rows]
    assert format_list([], json_output=True) == "[]"
    assert format_list([], json_output=False) == "Mail queue is empty"


def test_format_list_human_shows_status_retry_and_error(store: QueueStore) -> None:
    store.insert([("M1", message(local("alice"), remote("bob@remote.test"), sender=""))], now=NOW)
    due = {r.address: r.rcpt_id for r in store.due(NOW, 10)}
    store.defer(
        due["bob@remote.test"],
        now=NOW,
        next_attempt=NOW + 600,
        outcome=o("deferred", "451 4.3.0 try\x1b[2J later"),
    )
    text = format_list(store.list_messages(), json_output=False, now=NOW + 300)
    lines = text.splitlines()
    assert lines[1].split() == ["M1", "5m", str(len(DATA)), "<>"]
    assert "pending    <alice@example.test>  attempts 0, next retry now" in text
    assert "deferred   <bob@remote.test>  attempts 1, next retry 2027-01-15T08:10:00Z (in 5m)" in (
        text
    )
    assert "451 4.3.0 try\\x1b[2J later" in text  # no raw escape reaches the terminal
    assert "\x1b" not in text
    assert lines[-1] == f"-- 1 message, {len(DATA)} bytes, 2 recipients waiting"


def test_format_show_has_envelope_history_and_headers(store: QueueStore) -> None:
    rcpt = NewRecipient("alice@example.test", "postmaster@example.test", "alice")
    store.insert([("M1", message(rcpt, remote("bob@remote.test")))], now=NOW)
    due = {r.address: r.rcpt_id for r in store.due(NOW, 10)}
    store.fail(due["bob@remote.test"], now=NOW + 2, outcome=o("failed", "550 5.1.1 unknown user"))
    info = store.show("M1")
    assert info is not None
    text = format_show(info, now=NOW + 7200)
    assert "Queue ID:  M1" in text
    assert "Received:  2027-01-15T08:00:00Z (2h ago)" in text
    assert "Client:    192.0.2.1" in text
    assert "<alice@example.test>  (mailbox alice, for <postmaster@example.test>)" in text
    assert "<bob@remote.test>  (remote)" in text
    assert "2027-01-15T08:00:02Z  failed     550 5.1.1 unknown user" in text
    assert text.endswith("Headers:\n  Received: from client\n  Subject: hello")


# -- outcome fields and schema migration ---------------------------------------------------

# The schema of trio_mta 0.x up to version 2, before outcomes had columns.
V2_SCHEMA = """
CREATE TABLE messages (id TEXT PRIMARY KEY, sender TEXT NOT NULL, received_at REAL NOT NULL,
    size INTEGER NOT NULL, meta TEXT NOT NULL DEFAULT '{}');
CREATE TABLE bodies (message_id TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE recipients (id INTEGER PRIMARY KEY, message_id TEXT NOT NULL,
    address TEXT NOT NULL, original TEXT NOT NULL, mailbox TEXT, local INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'deferred', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL, last_error TEXT,
    updated_at REAL NOT NULL);
CREATE INDEX recipients_message ON recipients (message_id);
CREATE INDEX recipients_due ON recipients (local, next_attempt)
    WHERE status IN ('pending', 'deferred');
CREATE TABLE attempts (id INTEGER PRIMARY KEY, rcpt_id INTEGER NOT NULL, at REAL NOT NULL,
    outcome TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX attempts_rcpt ON attempts (rcpt_id);
CREATE INDEX recipients_failed ON recipients (message_id) WHERE status = 'failed';
PRAGMA user_version=2;
"""


def version_2_queue(path: Path) -> None:
    """A queue as version 2 left it: one deferred and one failed recipient, text only."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(V2_SCHEMA)
    conn.execute(
        "INSERT INTO messages VALUES ('OLD', 's@example.org', ?, ?, '{}')", (NOW, len(DATA))
    )
    conn.execute("INSERT INTO bodies VALUES ('OLD', ?)", (DATA,))
    for rcpt_id, address, status, error in [
        (1, "a@remote.test", "deferred", "451 4.3.0 try later (mx.remote.test[192.0.2.1])"),
        (2, "b@remote.test", "failed", "550 5.1.1 no such user (mx.remote.test[192.0.2.1])"),
    ]:
        conn.execute(
            "INSERT INTO recipients VALUES (?, 'OLD', ?, ?, NULL, 0, ?, 1, ?, ?, ?)",
            (rcpt_id, address, address, status, NOW + 600, error, NOW + 1),
        )
        conn.execute(
            "INSERT INTO attempts (rcpt_id, at, outcome, detail) VALUES (?, ?, ?, ?)",
            (rcpt_id, NOW + 1, status, error),
        )
    conn.close()


def test_outcome_fields_round_trip_through_the_store(store: QueueStore) -> None:
    store.insert([("M1", message(remote("bob@remote.test")))], now=NOW)
    (r,) = store.due(NOW, 10)
    sent = o(
        "failed",
        "550 5.1.1 no such user",
        remote_host="mx.remote.test",
        remote_address="192.0.2.1",
        stage="rcpt",
    )
    store.fail(r.rcpt_id, now=NOW + 1, outcome=sent)
    info = store.show("M1")
    assert info is not None
    (rcpt,) = info.recipients
    assert rcpt.last == sent
    assert rcpt.last_error == "550 5.1.1 no such user (mx.remote.test[192.0.2.1], rcpt)"
    assert [a.outcome for a in rcpt.history] == [sent]
    (finished,) = store.bounce_candidates()
    assert [f.outcome for f in finished.failed] == [sent]


def test_a_version_2_queue_is_migrated_and_its_rows_stay_readable(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    version_2_queue(path)
    # The CLI may read it before the server has migrated it.
    readonly = QueueStore(path, readonly=True)
    before = readonly.show("OLD")
    readonly.close()
    store = QueueStore(path)
    (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
    assert version == 5
    after = store.show("OLD")
    for info in (before, after):
        assert info is not None
        deferred, failed = info.recipients
        assert deferred.last_error == "451 4.3.0 try later (mx.remote.test[192.0.2.1])"
        assert deferred.last is not None and deferred.last.status == "4.3.0"
        assert failed.last is not None and failed.last.status == "5.1.1"
        assert [a.outcome.status for a in failed.history] == ["5.1.1"]
    assert [m.id for m in store.list_messages()] == ["OLD"]
    # New attempts on old rows record every field.
    (due,) = store.due(NOW + 600, 10)
    store.mark_delivered([due.rcpt_id], now=NOW + 601, outcome=o("delivered", "250 2.0.0 ok"))
    (finished,) = store.bounce_candidates()
    assert [(f.address, f.outcome.status) for f in finished.failed] == [("b@remote.test", "5.1.1")]
    store.close()


# -- bodies: inline, files, bodies written before schema 4 ------------------------


def _spooled(store: QueueStore, name: str, body: bytes) -> NewMessage:
    store.files.ensure_spool()
    path = store.files.spool / name
    path.write_bytes(body)
    return NewMessage(
        "s@example.org",
        (local("bob"),),
        b"Received: x\r\n",
        spooled=SpooledBody(path, len(body), crc_of(body)),
    )


def test_blob_bodies_from_before_schema_4_are_still_delivered(tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite3"
    old = QueueStore(db)
    old.insert([("OLD", message(local("bob")))], now=NOW)
    old.close()
    # Make it the database an older trio_mta wrote: no body index, schema 3.
    conn = sqlite3.connect(db)
    conn.executescript(
        "DROP TRIGGER messages_gone; DROP TABLE body_index; DROP TABLE damaged;"
        " DROP TABLE doomed_bodies; PRAGMA user_version=3;"
    )
    conn.close()
    store = QueueStore(db)
    assert store.data_many(["OLD"]) == {"OLD": DATA}
    [due] = store.due(NOW, 10)
    store.mark_delivered([due.rcpt_id], now=NOW, outcome=o("delivered", "2.0.0 ok"))
    assert store.list_messages() == []
    store.close()


def test_spooled_body_becomes_a_file_and_goes_after_a_durable_commit(store: QueueStore) -> None:
    body = b"Subject: big\r\n\r\n" + b"z" * 200_000
    store.insert([("BIG", _spooled(store, "spool1", body))], now=NOW)
    path = store.files.path_for("BIG")
    assert path.read_bytes() == body and not (store.files.spool / "spool1").exists()
    assert store.data("BIG") == b"Received: x\r\n" + body
    assert store.list_messages()[0].size == len(body) + len(b"Received: x\r\n")
    [due] = store.due(NOW, 10)
    # Recorded with synchronous=NORMAL:
    store.mark_delivered([due.rcpt_id], now=NOW, outcome=o("delivered", "2.0.0 ok"))
    assert path.exists(), "kept until a durable commit covers the delete"
    store.insert([("NEXT", message(local("bob")))], now=NOW)  # synchronous=FULL
    assert not path.exists()


def test_damaged_body_file_is_set_aside_not_due_and_listed(store: QueueStore) -> None:
    body = b"Subject: big\r\n\r\n" + b"z" * 200_000
    store.insert([("BAD", _spooled(store, "s1", body)), ("GOOD", message(local("bob")))], now=NOW)
    with open(store.files.path_for("BAD"), "r+b") as f:
        f.write(b"X")
    assert store.data_many(["BAD", "GOOD"]) == {"GOOD": DATA}
    assert [r.message_id for r in store.due(NOW + 10, 10)] == ["GOOD"]
    rows = {row.id: row for row in store.list_messages()}
    assert "checksum" in (rows["BAD"].damaged or "") and rows["GOOD"].damaged is None
    assert "damaged" in message_json(rows["BAD"]) and "damaged" not in message_json(rows["GOOD"])
    assert "DAMAGED" in format_list(list(rows.values()), json_output=False)
    # A flush (every server start) tries the body again: repaired, it is delivered.
    store.files.path_for("BAD").write_bytes(body)
    store.flush(now=NOW + 20)
    assert store.data("BAD").endswith(body)


def test_sweep_removes_spool_leftovers_and_unindexed_body_files(store: QueueStore) -> None:
    body = b"b" * 100_000
    store.insert([("KEEP", _spooled(store, "s1", body))], now=NOW)
    (store.files.spool / "half-received").write_bytes(b"partial")
    orphan = store.files.path_for("NOROW")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"renamed, never committed")
    assert store.sweep() == 2
    assert store.files.path_for("KEEP").exists() and not orphan.exists()
    assert list(store.files.spool.iterdir()) == []
