"""The durable queue: messages, bodies and per-recipient state in one SQLite file.

Synchronous on purpose: the server calls it from worker threads (trio.to_thread)
and the CLI calls it directly. WAL mode lets the CLI read and flush while the
server writes. One QueueStore owns one writer connection (inserts and status
updates, serialised by a lock) and one reader connection (due items, bodies,
listings), so reading the next batch never waits for a commit's fsync.

Durability (SPEC §5 "Durability"): `insert` commits with synchronous=FULL, so the
WAL is fsynced before it returns and before the client hears 250. Status updates
commit with synchronous=NORMAL: a 'delivered' mark lost in a crash only causes a
second delivery, never a lost message; the next FULL commit or checkpoint makes
them durable anyway, because fsync covers every earlier frame of the WAL.

Leases are in memory: a recipient handed out by `due` is not handed out again
until an update or `release` returns it. After a restart nothing is leased, so
whatever was in flight is simply due again (at-least-once delivery).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

Status = Literal["pending", "deferred", "delivered", "failed"]
UNFINISHED = ("pending", "deferred")
_SCHEMA_VERSION = 2  # 2: recipients_failed index (bounces); the script is idempotent
_CHUNK = 500  # stay far below SQLite's host-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id          TEXT PRIMARY KEY,
    sender      TEXT NOT NULL,
    received_at REAL NOT NULL,
    size        INTEGER NOT NULL,
    meta        TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS bodies (
    message_id  TEXT PRIMARY KEY,
    data        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients (
    id           INTEGER PRIMARY KEY,
    message_id   TEXT NOT NULL,
    address      TEXT NOT NULL,
    original     TEXT NOT NULL,
    mailbox      TEXT,
    local        INTEGER NOT NULL,
    status       TEXT NOT NULL
                 CHECK (status IN ('pending', 'deferred', 'delivered', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error   TEXT,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS recipients_message ON recipients (message_id);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients (local, next_attempt)
    WHERE status IN ('pending', 'deferred');
CREATE TABLE IF NOT EXISTS attempts (
    id       INTEGER PRIMARY KEY,
    rcpt_id  INTEGER NOT NULL,
    at       REAL NOT NULL,
    outcome  TEXT NOT NULL,
    detail   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_rcpt ON attempts (rcpt_id);
CREATE INDEX IF NOT EXISTS recipients_failed ON recipients (message_id)
    WHERE status = 'failed';
"""


class QueueError(Exception):
    """The queue could not do what was asked (disk, lock or database trouble)."""


@dataclass(frozen=True)
class NewRecipient:
    address: str
    original: str
    mailbox: str | None  # None: remote recipient


@dataclass(frozen=True)
class NewMessage:
    sender: str
    recipients: tuple[NewRecipient, ...]
    data: bytes  # the message as received (CRLF), Received: already prepended
    meta: Mapping[str, str] = field(default_factory=dict)  # client ip, helo, auth user...


@dataclass(frozen=True)
class DueRecipient:
    message_id: str
    rcpt_id: int
    address: str
    original: str
    mailbox: str | None
    sender: str
    attempts: int
    received_at: float


@dataclass(frozen=True)
class RecipientUpdate:
    """One attempt's result; `next_attempt` is required for 'deferred'."""

    rcpt_id: int
    status: Literal["delivered", "deferred", "failed"]
    detail: str
    next_attempt: float | None = None


@dataclass(frozen=True)
class FailedRecord:
    """One failed recipient of a finished message, as the bounce reports it."""

    address: str
    original: str
    error: str
    failed_at: float


@dataclass(frozen=True)
class FinishedMessage:
    """A message no recipient of which is still pending or deferred, with failures."""

    message_id: str
    sender: str
    received_at: float
    data: bytes
    failed: tuple[FailedRecord, ...]


def iso(ts: float | None) -> str | None:
    """Unix time as ISO-8601 UTC with a "Z", as SPEC §8 shows."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _chunks(seq: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), _CHUNK):
        yield seq[start : start + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _header_section(data: bytes) -> str:
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    return head.decode("utf-8", "replace").replace("\r\n", "\n")


@contextmanager
def _errors(what: str) -> Iterator[None]:
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise QueueError(f"queue {what} failed: {exc}") from exc


class QueueStore:
    """One process's handle on the queue database (thread-safe)."""

    def __init__(self, path: Path, *, readonly: bool = False, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.commits = 0  # every write transaction
        self.durable_commits = 0  # those committed with synchronous=FULL (one WAL fsync each)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._lease_lock = threading.Lock()
        self._leased: set[int] = set()
        self._sync = ""
        self._writer: sqlite3.Connection | None = None
        with _errors("open"):
            if readonly:
                if not self.path.exists():
                    raise QueueError(f"no queue database at {self.path}")
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._reader = self._connect(uri, busy_timeout, uri=True)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Mail is private: SQLite gives -wal and -shm the database file's mode.
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
                self._writer = self._connect(str(self.path), busy_timeout)
                self._writer.execute("PRAGMA journal_mode=WAL")
                self._create_schema(self._writer)
                self._reader = self._connect(str(self.path), busy_timeout)

    @staticmethod
    def _connect(target: str, busy_timeout: float, *, uri: bool = False) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; check_same_thread=False
        # because trio's worker threads take turns, serialised by our locks.
        conn = sqlite3.connect(
            target, timeout=busy_timeout, isolation_level=None, check_same_thread=False, uri=uri
        )
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        return conn

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version >= _SCHEMA_VERSION:
            return
        try:
            # executescript commits any open transaction first, so BEGIN goes inside it.
            conn.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={_SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _transaction(self, synchronous: str) -> Iterator[sqlite3.Connection]:
        if self._writer is None:
            raise QueueError("queue opened read-only")
        with self._write_lock:
            conn = self._writer
            if self._sync != synchronous:
                conn.execute(f"PRAGMA synchronous={synchronous}")
                self._sync = synchronous
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.commits += 1
            if synchronous == "FULL":
                self.durable_commits += 1

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            yield self._reader

    # -- accepting mail ---------------------------------------------------------------

    def insert(self, items: Sequence[tuple[str, NewMessage]], *, now: float) -> None:
        """Store messages under their IDs in ONE transaction, fsynced before returning."""
        with _errors("insert"), self._transaction("FULL") as conn:
            self._insert_rows(conn, items, now)

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, items: Sequence[tuple[str, NewMessage]],
                     now: float) -> None:
        messages = []
        bodies = []
        rcpts = []
        for message_id, msg in items:
            messages.append(
                (message_id, msg.sender, now, len(msg.data), json.dumps(dict(msg.meta)))
            )
            bodies.append((message_id, msg.data))
            for r in msg.recipients:
                rcpts.append(
                    (message_id, r.address, r.original, r.mailbox, r.mailbox is not None, now, now)
                )
        conn.executemany(
            "INSERT INTO messages (id, sender, received_at, size, meta) VALUES (?,?,?,?,?)",
            messages,
        )
        conn.executemany("INSERT INTO bodies (message_id, data) VALUES (?,?)", bodies)
        conn.executemany(
            "INSERT INTO recipients (message_id, address, original, mailbox, local, status,"
            " next_attempt, updated_at) VALUES (?,?,?,?,?,'pending',?,?)",
            rcpts,
        )

    # -- handing out work -----------------------------------------------------------------

    def due(self, now: float, limit: int, *, local: bool | None = None) -> list[DueRecipient]:
        """Lease and return up to `limit` pending/deferred recipients due at `now`.

        The lease lock is held across the query and the lease so that a recipient
        whose delivery is being recorded right now cannot slip out twice.
        """
        if limit <= 0:
            return []
        kinds = [True, False] if local is None else [local]
        with _errors("due"), self._lease_lock, self._read() as conn:
            rows: list[tuple[Any, ...]] = []
            for kind in kinds:
                rows += conn.execute(
                    "SELECT r.next_attempt, r.message_id, r.id, r.address, r.original, r.mailbox,"
                    " m.sender, r.attempts, m.received_at"
                    " FROM recipients r JOIN messages m ON m.id = r.message_id"
                    " WHERE r.local = ? AND r.status IN ('pending', 'deferred')"
                    " AND r.next_attempt <= ? ORDER BY r.next_attempt LIMIT ?",
                    (kind, now, limit + len(self._leased)),
                ).fetchall()
            if len(kinds) > 1:
                rows.sort(key=lambda row: row[0])
            out = []
            for row in rows:
                if row[2] in self._leased:
                    continue
                out.append(DueRecipient(*row[1:]))
                if len(out) == limit:
                    break
            self._leased.update(r.rcpt_id for r in out)
        return out

    def next_due(self, *, local: bool | None = None) -> float | None:
        """Earliest next_attempt among unleased pending/deferred recipients, or None."""
        kinds = [True, False] if local is None else [local]
        best: float | None = None
        with _errors("next_due"), self._lease_lock, self._read() as conn:
            for kind in kinds:
                for rcpt_id, when in conn.execute(
                    "SELECT id, next_attempt FROM recipients"
                    " WHERE local = ? AND status IN ('pending', 'deferred')"
                    " ORDER BY next_attempt LIMIT ?",
                    (kind, len(self._leased) + 1),
                ):
                    if rcpt_id not in self._leased:
                        best = when if best is None else min(best, when)
                        break
        return best

    def release(self, rcpt_ids: Sequence[int]) -> None:
        """Return leases without recording anything (a cancelled or abandoned attempt)."""
        with self._lease_lock:
            self._leased.difference_update(rcpt_ids)

    @property
    def leased(self) -> int:
        return len(self._leased)

    def data(self, message_id: str) -> bytes:
        """The stored message; KeyError when it is gone (deleted or purged)."""
        with _errors("read"), self._read() as conn:
            row = conn.execute(
                "SELECT data FROM bodies WHERE message_id = ?", (message_id,)
            ).fetchone()
        if row is None:
            raise KeyError(message_id)
        return bytes(row[0])

    def data_many(self, message_ids: Sequence[str]) -> dict[str, bytes]:
        """Bodies of several messages in one pass (missing ones are left out)."""
        ids = list(dict.fromkeys(message_ids))
        out: dict[str, bytes] = {}
        with _errors("read"), self._read() as conn:
            for part in _chunks(ids):
                sql = (
                    f"SELECT message_id, data FROM bodies WHERE message_id IN ({_marks(len(part))})"
                )
                for message_id, blob in conn.execute(sql, tuple(part)):
                    out[message_id] = bytes(blob)
        return out

    # -- recording outcomes ---------------------------------------------------------------

    def update(
        self, updates: Sequence[RecipientUpdate], *, now: float, purge_delivered: bool = True
    ) -> None:
        """Record attempt results in one transaction, then release their leases.

        On failure (QueueError) the leases are kept: the caller still holds the
        results and retries, rather than delivering the same mail again.

        synchronous=NORMAL (see module doc). Messages whose every recipient is now
        delivered are dropped at once, bodies too, so the database stays small;
        messages with a failed recipient stay until the bounce is queued.
        """
        if not updates:
            return
        for u in updates:
            if u.status == "deferred" and u.next_attempt is None:
                raise ValueError("a deferred update needs next_attempt")
        ids = [u.rcpt_id for u in updates]
        with _errors("update"), self._transaction("NORMAL") as conn:
            conn.executemany(
                "UPDATE recipients SET status = ?, attempts = attempts + 1,"
                " next_attempt = COALESCE(?, next_attempt), last_error = ?, updated_at = ?"
                " WHERE id = ?",
                [
                    (
                        u.status,
                        u.next_attempt,
                        None if u.status == "delivered" else u.detail,
                        now,
                        u.rcpt_id,
                    )
                    for u in updates
                ],
            )
            # INSERT ... SELECT skips recipients deleted meanwhile (`queue delete`).
            conn.executemany(
                "INSERT INTO attempts (rcpt_id, at, outcome, detail)"
                " SELECT id, ?, ?, ? FROM recipients WHERE id = ?",
                [(now, u.status, u.detail, u.rcpt_id) for u in updates],
            )
            if purge_delivered:
                self._purge_delivered(conn, ids)
        self.release(ids)

    @staticmethod
    def _purge_delivered(conn: sqlite3.Connection, rcpt_ids: Sequence[int]) -> None:
        message_ids: set[str] = set()
        for part in _chunks(rcpt_ids):
            message_ids.update(
                row[0]
                for row in conn.execute(
                    f"SELECT DISTINCT message_id FROM recipients WHERE id IN ({_marks(len(part))})",
                    tuple(part),
                )
            )
        done = [
            (mid,)
            for mid in message_ids
            if conn.execute(
                "SELECT 1 FROM recipients WHERE message_id = ? AND status != 'delivered' LIMIT 1",
                (mid,),
            ).fetchone()
            is None
        ]
        _delete_messages(conn, done)

    def mark_delivered(self, rcpt_ids: Sequence[int], *, now: float, detail: str) -> None:
        self.update([RecipientUpdate(i, "delivered", detail) for i in rcpt_ids], now=now)

    def defer(self, rcpt_id: int, *, now: float, next_attempt: float, error: str) -> None:
        self.update([RecipientUpdate(rcpt_id, "deferred", error, next_attempt)], now=now)

    def fail(self, rcpt_id: int, *, now: float, error: str) -> None:
        self.update([RecipientUpdate(rcpt_id, "failed", error)], now=now)

    def stats(self, now: float | None = None) -> tuple[int, float | None]:
        """(recipients not yet delivered or failed, age in seconds of the oldest) for metrics."""
        with _errors("read"), self._read() as conn:
            count, oldest = conn.execute(
                "SELECT COUNT(*), MIN(m.received_at) FROM recipients r"
                " JOIN messages m ON m.id = r.message_id"
                " WHERE r.status IN ('pending', 'deferred')"
            ).fetchone()
        when = time.time() if now is None else now
        return int(count), None if oldest is None else max(0.0, when - float(oldest))

    # -- bounces ----------------------------------------------------------------------

    def bounce_candidates(self, limit: int = 20) -> list[FinishedMessage]:
        """Finished messages with failed recipients whose bounce is not queued yet.

        One bounce per message (RFC 3464 reports all its failures together), so a
        message waits until every recipient is delivered or failed.
        """
        with _errors("read"), self._read() as conn:
            conn.execute("BEGIN")
            try:
                rows = conn.execute(
                    "SELECT m.id, m.sender, m.received_at, b.data FROM messages m"
                    " JOIN bodies b ON b.message_id = m.id"
                    " WHERE m.id IN (SELECT DISTINCT message_id FROM recipients"
                    "                WHERE status = 'failed')"
                    " AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                    "                 AND r.status IN ('pending', 'deferred'))"
                    " ORDER BY m.received_at LIMIT ?",
                    (limit,),
                ).fetchall()
                out = []
                for message_id, sender, received_at, data in rows:
                    failed = tuple(
                        FailedRecord(address, original, error or "", updated_at)
                        for address, original, error, updated_at in conn.execute(
                            "SELECT address, original, last_error, updated_at FROM recipients"
                            " WHERE message_id = ? AND status = 'failed' ORDER BY id",
                            (message_id,),
                        )
                    )
                    out.append(FinishedMessage(message_id, sender, received_at, bytes(data),
                                               failed))
                return out
            finally:
                conn.execute("COMMIT")

    def settle(self, message_id: str, bounce: tuple[str, NewMessage] | None, *,
               now: float) -> None:
        """Queue the bounce (if any) and drop the finished message, in ONE fsynced step.

        A crash can therefore neither lose the bounce nor send it twice.
        """
        with _errors("settle"), self._transaction("FULL") as conn:
            if bounce is not None:
                self._insert_rows(conn, [bounce], now)
            _delete_messages(conn, [(message_id,)])

    # -- administration (the `queue` commands) ---------------------------------------

    def flush(
        self, message_id: str | None = None, *, now: float | None = None, local: bool | None = None
    ) -> int:
        """Make pending/deferred recipients due at `now`; returns how many.

        A running scheduler polls at least every second, so this works from the CLI.
        """
        when = time.time() if now is None else now
        sql = (
            "UPDATE recipients SET next_attempt = MIN(next_attempt, ?)"
            " WHERE status IN ('pending', 'deferred')"
        )
        args: list[Any] = [when]
        if message_id is not None:
            sql += " AND message_id = ?"
            args.append(message_id)
        if local is not None:
            sql += " AND local = ?"
            args.append(local)
        with _errors("flush"), self._transaction("FULL") as conn:
            return int(conn.execute(sql, args).rowcount)

    def delete(self, message_id: str) -> bool:
        """Drop a message and everything about it (no bounce); False if unknown."""
        with _errors("delete"), self._transaction("FULL") as conn:
            row = conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                return False
            _delete_messages(conn, [(message_id,)])
        return True

    def purge_finished(self, *, keep_failed: bool = False) -> int:
        """Drop messages with no pending/deferred recipient; returns how many.

        keep_failed=True keeps messages that still have a failed recipient (their
        bounce has not been queued yet).
        """
        finished = ("pending", "deferred", "failed") if keep_failed else UNFINISHED
        with _errors("purge"), self._transaction("NORMAL") as conn:
            done = conn.execute(
                "SELECT id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r"
                f" WHERE r.message_id = m.id AND r.status IN ({_marks(len(finished))}))",
                finished,
            ).fetchall()
            _delete_messages(conn, done)
        return len(done)

    def list_messages(self) -> list[dict[str, Any]]:
        """Queued messages in the shape of SPEC §8, oldest first."""
        with _errors("list"), self._read() as conn:
            conn.execute("BEGIN")
            try:
                msgs = conn.execute(
                    "SELECT id, sender, received_at, size FROM messages m WHERE EXISTS"
                    " (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                    " AND r.status IN ('pending', 'deferred')) ORDER BY received_at, id"
                ).fetchall()
                rcpts = conn.execute(
                    "SELECT r.message_id, r.address, r.status, r.attempts, r.next_attempt,"
                    " r.last_error FROM recipients r WHERE r.message_id IN (SELECT message_id"
                    " FROM recipients WHERE status IN ('pending', 'deferred')) ORDER BY r.id"
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        by_message: dict[str, list[dict[str, Any]]] = {}
        for message_id, address, status, attempts, next_attempt, last_error in rcpts:
            by_message.setdefault(message_id, []).append(
                {
                    "address": address,
                    "status": status,
                    "attempts": attempts,
                    "next_attempt": iso(next_attempt) if status in UNFINISHED else None,
                    "last_error": last_error,
                }
            )
        return [
            {
                "id": message_id,
                "sender": sender,
                "received_at": iso(received_at),
                "size": size,
                "recipients": by_message.get(message_id, []),
            }
            for message_id, sender, received_at, size in msgs
        ]

    def show(self, message_id: str) -> dict[str, Any] | None:
        """Everything about one message (also finished ones not yet purged)."""
        with _errors("show"), self._read() as conn:
            conn.execute("BEGIN")
            try:
                msg = conn.execute(
                    "SELECT m.id, m.sender, m.received_at, m.size, m.meta, b.data FROM messages m"
                    " LEFT JOIN bodies b ON b.message_id = m.id WHERE m.id = ?",
                    (message_id,),
                ).fetchone()
                if msg is None:
                    return None
                rcpts = conn.execute(
                    "SELECT id, address, original, mailbox, status, attempts, next_attempt,"
                    " last_error, updated_at FROM recipients WHERE message_id = ? ORDER BY id",
                    (message_id,),
                ).fetchall()
                history = conn.execute(
                    "SELECT a.rcpt_id, a.at, a.outcome, a.detail FROM attempts a"
                    " JOIN recipients r ON r.id = a.rcpt_id WHERE r.message_id = ?"
                    " ORDER BY a.id",
                    (message_id,),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        attempts_by_rcpt: dict[int, list[dict[str, Any]]] = {}
        for rcpt_id, at, outcome, detail in history:
            attempts_by_rcpt.setdefault(rcpt_id, []).append(
                {"at": iso(at), "outcome": outcome, "detail": detail}
            )
        mid, sender, received_at, size, meta, data = msg
        return {
            "id": mid,
            "sender": sender,
            "received_at": iso(received_at),
            "size": size,
            "meta": json.loads(meta),
            "recipients": [
                {
                    "address": address,
                    "original": original,
                    "mailbox": mailbox,
                    "status": status,
                    "attempts": attempts,
                    "next_attempt": iso(next_attempt) if status in UNFINISHED else None,
                    "last_error": last_error,
                    "updated_at": iso(updated_at),
                    "history": attempts_by_rcpt.get(rcpt_id, []),
                }
                for (
                    rcpt_id,
                    address,
                    original,
                    mailbox,
                    status,
                    attempts,
                    next_attempt,
                    last_error,
                    updated_at,
                ) in rcpts
            ],
            "headers": _header_section(bytes(data)) if data is not None else "",
        }

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            if self._writer is not None:
                self._writer.close()
            self._reader.close()


def _delete_messages(conn: sqlite3.Connection, ids: Sequence[tuple[str]]) -> None:
    if not ids:
        return
    conn.executemany(
        "DELETE FROM attempts WHERE rcpt_id IN (SELECT id FROM recipients WHERE message_id = ?)",
        ids,
    )
    conn.executemany("DELETE FROM recipients WHERE message_id = ?", ids)
    conn.executemany("DELETE FROM bodies WHERE message_id = ?", ids)
    conn.executemany("DELETE FROM messages WHERE id = ?", ids)
