"""The durable queue: messages and per-recipient state in SQLite, large bodies in files.

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

Bodies (see queue/bodies.py): up to the spool threshold they are a BLOB in
`bodies`; larger ones are a file per message, renamed into place and its folder
fsynced before the row naming it commits. `body_index` holds every new body's
size and CRC-32, so a damaged body is found when read and only that message is
set aside (`damaged`); rows written before schema 3 have no index and are read
as they are. Deleting a message queues its body file in `doomed_bodies` (a
trigger); the file is unlinked after the next fsynced commit, so a delete that a
crash undoes never leaves a row without its body.

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
from pathlib import Path
from typing import Any, Final, Literal, cast

from trio_mta import log
from trio_mta.delivery.outcome import Outcome, Stage, status_in
from trio_mta.queue.bodies import BodyDamaged, BodyFiles, SpooledBody, StoredBody, crc_of
from trio_mta.queue.recover import check_database, recover_database

Status = Literal["pending", "deferred", "delivered", "failed"]
UNFINISHED = ("pending", "deferred")
# 2: recipients_failed index (bounces); 3: outcome fields as columns; 4: body_index,
# damaged, doomed_bodies (body files, queue/bodies.py). The script is idempotent;
# columns added after a table's first release are listed in _ADDED_COLUMNS and
# added to older databases by _migrate. 5: RFC 3461 DSN columns (ret, envid; notify,
# orcpt, notice, warned).
_SCHEMA_VERSION = 5
# next_attempt of the recipients of a damaged message: never due until a flush
# (every server start is one) tries the body again.
SET_ASIDE_UNTIL = 253402300799.0  # 9999-12-31T23:59:59Z
_CHUNK = 500  # stay far below SQLite's host-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id          TEXT PRIMARY KEY,
    sender      TEXT NOT NULL,
    received_at REAL NOT NULL,
    size        INTEGER NOT NULL,
    meta        TEXT NOT NULL DEFAULT '{}',
    ret         TEXT,              -- RFC 3461 RET: FULL | HDRS | NULL
    envid       TEXT               -- RFC 3461 ENVID, decoded
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
    updated_at   REAL NOT NULL,
    last_code    INTEGER,
    last_status  TEXT,
    last_text    TEXT,
    last_host    TEXT,
    last_address TEXT,
    last_stage   TEXT,
    notify       TEXT,             -- RFC 3461 NOTIFY as given ("SUCCESS,DELAY"), NULL: absent
    orcpt        TEXT,             -- RFC 3461 ORCPT address (rfc822), decoded
    notice       TEXT,             -- a success DSN owed: 'delivered' | 'relayed'
    warned       INTEGER NOT NULL DEFAULT 0  -- the one delay DSN was queued
);
CREATE INDEX IF NOT EXISTS recipients_message ON recipients (message_id);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients (local, next_attempt)
    WHERE status IN ('pending', 'deferred');
CREATE TABLE IF NOT EXISTS attempts (
    id       INTEGER PRIMARY KEY,
    rcpt_id  INTEGER NOT NULL,
    at       REAL NOT NULL,
    outcome  TEXT NOT NULL,
    detail   TEXT NOT NULL,
    code     INTEGER,
    status   TEXT,
    text     TEXT,
    host     TEXT,
    address  TEXT,
    stage    TEXT
);
CREATE INDEX IF NOT EXISTS attempts_rcpt ON attempts (rcpt_id);
CREATE INDEX IF NOT EXISTS recipients_failed ON recipients (message_id)
    WHERE status = 'failed';
CREATE TABLE IF NOT EXISTS body_index (
    message_id  TEXT PRIMARY KEY,
    head        BLOB NOT NULL,     -- file bodies: the trace headers we prepended
    in_file     INTEGER NOT NULL,  -- 1: bodies/<xx>/<id> holds the rest; 0: bodies.data
    size        INTEGER NOT NULL,  -- bytes of the file, or of the inline blob
    crc         INTEGER NOT NULL   -- CRC-32 of those bytes
);
CREATE TABLE IF NOT EXISTS damaged (
    message_id  TEXT PRIMARY KEY,
    reason      TEXT NOT NULL,
    at          REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS doomed_bodies (message_id TEXT PRIMARY KEY);
CREATE TRIGGER IF NOT EXISTS messages_gone AFTER DELETE ON messages BEGIN
    INSERT OR IGNORE INTO doomed_bodies
        SELECT message_id FROM body_index WHERE message_id = old.id AND in_file;
    DELETE FROM body_index WHERE message_id = old.id;
    DELETE FROM damaged WHERE message_id = old.id;
END;
"""
# Version 3's outcome columns, added to tables created by versions 1 and 2, and
# version 5's DSN columns.
_ADDED_COLUMNS: Final = {
    "messages": (("ret", "TEXT"), ("envid", "TEXT")),
    "recipients": (
        ("last_code", "INTEGER"),
        ("last_status", "TEXT"),
        ("last_text", "TEXT"),
        ("last_host", "TEXT"),
        ("last_address", "TEXT"),
        ("last_stage", "TEXT"),
        ("notify", "TEXT"),
        ("orcpt", "TEXT"),
        ("notice", "TEXT"),
        ("warned", "INTEGER NOT NULL DEFAULT 0"),
    ),
    "attempts": (
        ("code", "INTEGER"),
        ("status", "TEXT"),
        ("text", "TEXT"),
        ("host", "TEXT"),
        ("address", "TEXT"),
        ("stage", "TEXT"),
    ),
}
# The status a pre-version-3 row gets when its text carries none.
_DEFAULT_STATUS: Final = {"delivered": "2.0.0", "deferred": "4.0.0", "failed": "5.0.0"}


class QueueError(Exception):
    """The queue could not do what was asked (disk, lock or database trouble)."""


@dataclass(frozen=True)
class NewRecipient:
    address: str
    original: str
    mailbox: str | None  # None: remote recipient
    notify: tuple[str, ...] | None = None  # RFC 3461 NOTIFY; None: not given (FAILURE)
    orcpt: str | None = None  # RFC 3461 ORCPT address


def wants(notify: tuple[str, ...] | None, kind: str) -> bool:
    """Whether a recipient with ``notify`` gets a DSN of ``kind`` (RFC 3461 §4.1).

    Without NOTIFY only failures are reported, as before DSN existed.
    """
    return kind == "FAILURE" if notify is None else kind in notify


def _notify_text(notify: tuple[str, ...] | None) -> str | None:
    return None if notify is None else ",".join(notify)


def _notify_of(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(text.split(","))


@dataclass(frozen=True)
class NewMessage:
    sender: str
    recipients: tuple[NewRecipient, ...]
    data: bytes  # the message as received (CRLF), Received: already prepended
    meta: Mapping[str, str] = field(default_factory=dict)  # client ip, helo, auth user...
    # A large body already in a fsynced spool file: the message is `data` (then
    # only the prepended trace headers) followed by the file's bytes.
    spooled: SpooledBody | None = None
    ret: Literal["FULL", "HDRS"] | None = None  # RFC 3461 §4.3
    envid: str | None = None  # RFC 3461 §4.4

    @property
    def size(self) -> int:
        return len(self.data) + (self.spooled.size if self.spooled is not None else 0)


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
    notify: tuple[str, ...] | None = None  # RFC 3461, passed on to a next hop with DSN
    orcpt: str | None = None
    ret: Literal["FULL", "HDRS"] | None = None
    envid: str | None = None


@dataclass(frozen=True)
class RecipientUpdate:
    """One attempt's result; `next_attempt` is required when it is deferred."""

    rcpt_id: int
    outcome: Outcome
    next_attempt: float | None = None

    @property
    def status(self) -> Literal["delivered", "deferred", "failed"]:
        return self.outcome.kind


@dataclass(frozen=True)
class FailedRecord:
    """One failed recipient of a finished message, as the bounce reports it."""

    address: str
    original: str
    outcome: Outcome
    failed_at: float
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None


@dataclass(frozen=True)
class NoticeRecord:
    """A delivered recipient that asked for a success DSN (NOTIFY=SUCCESS)."""

    address: str
    original: str
    action: Literal["delivered", "relayed"]
    delivered_at: float
    orcpt: str | None = None


@dataclass(frozen=True)
class DelayedRecord:
    """A recipient still waiting that asked for a delay DSN (NOTIFY=DELAY)."""

    rcpt_id: int
    address: str
    original: str
    last: Outcome | None
    updated_at: float
    orcpt: str | None = None


@dataclass(frozen=True)
class DelayedMessage:
    """A message whose ``delayed`` recipients have waited past the delay warning."""

    message_id: str
    sender: str
    received_at: float
    data: bytes
    delayed: tuple[DelayedRecord, ...]
    envid: str | None = None


@dataclass(frozen=True)
class Attempt:
    """One recorded attempt (``queue show``'s history)."""

    at: float
    outcome: Outcome
    detail: str  # the one-line text recorded with it


@dataclass(frozen=True)
class RecipientState:
    """A queued recipient as ``queue list`` / ``queue show`` report it.

    ``last_error`` is the one-line text recorded with the last attempt, as
    SPEC §8 shows it; ``last`` is that attempt as data (None: never tried, or
    delivered). ``next_attempt`` is None once the recipient is finished.
    """

    address: str
    original: str
    mailbox: str | None
    status: Status
    attempts: int
    next_attempt: float | None
    updated_at: float
    last_error: str | None
    last: Outcome | None
    history: tuple[Attempt, ...] = ()


@dataclass(frozen=True)
class QueuedMessage:
    """A message in the queue; ``meta`` and ``headers`` are filled by ``show`` only."""

    id: str
    sender: str
    received_at: float
    size: int
    recipients: tuple[RecipientState, ...]
    meta: Mapping[str, str] = field(default_factory=dict)
    headers: str = ""
    damaged: str | None = None  # why the message is set aside (docs/queue.md "Damage")


@dataclass(frozen=True)
class FinishedMessage:
    """A message no recipient of which is still pending or deferred, with failures."""

    message_id: str
    sender: str
    received_at: float
    data: bytes
    failed: tuple[FailedRecord, ...]
    notices: tuple[NoticeRecord, ...] = ()
    ret: Literal["FULL", "HDRS"] | None = None
    envid: str | None = None


def _chunks(seq: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), _CHUNK):
        yield seq[start : start + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _header_section(data: bytes) -> str:
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    return head.decode("utf-8", "replace").replace("\r\n", "\n")


def _outcome(kind: str, fields: Sequence[Any]) -> Outcome:
    """An Outcome from its stored columns (code, status, text, host, address, stage)."""
    code, status, text, host, address, stage = fields
    return Outcome(
        cast(Literal["delivered", "deferred", "failed"], kind),
        status or _DEFAULT_STATUS.get(kind, "4.0.0"),
        text or "",
        code,
        host,
        address,
        cast(Stage | None, stage),
    )


def _outcome_columns(outcome: Outcome) -> tuple[Any, ...]:
    return (
        outcome.code,
        outcome.status,
        outcome.text,
        outcome.remote_host,
        outcome.remote_address,
        outcome.stage,
    )


_LAST_COLUMNS: Final = "last_code, last_status, last_text, last_host, last_address, last_stage"


def _recipient_row(update: RecipientUpdate, now: float) -> tuple[Any, ...]:
    """Parameters of ``update``'s UPDATE: a delivered recipient keeps no error."""
    delivered = update.status == "delivered"
    return (
        update.status,
        update.next_attempt,
        None if delivered else update.outcome.detail,
        now,
        *((None,) * 6 if delivered else _outcome_columns(update.outcome)),
        delivered,
        update.outcome.dsn_passed,
        update.rcpt_id,
    )


def _recipient_state(row: Sequence[Any], history: tuple[Attempt, ...] = ()) -> RecipientState:
    """From (address, original, mailbox, status, attempts, next_attempt, updated_at,
    last_error, *last columns)."""
    address, original, mailbox, status, attempts, next_attempt, updated_at, error = row[:8]
    fields = row[8:]
    last: Outcome | None = None
    if fields[1] is not None and status != "delivered":
        last = _outcome(status, fields)
    elif error is not None and status != "delivered":
        # A row of an older version not migrated yet (a read-only open): text only.
        last = _outcome(status, (None, status_in(error), error, None, None, None))
    return RecipientState(
        address=address,
        original=original,
        mailbox=mailbox,
        status=status,
        attempts=attempts,
        next_attempt=next_attempt if status in UNFINISHED else None,
        updated_at=updated_at,
        last_error=error,
        last=last,
        history=history,
    )


_STATE_COLUMNS: Final = (
    "address, original, mailbox, status, attempts, next_attempt, updated_at, last_error, "
    + _LAST_COLUMNS
)
_ATTEMPT_COLUMNS: Final = "a.code, a.status, a.text, a.host, a.address, a.stage"


@dataclass(frozen=True)
class _Columns:
    """What listings select: the outcome columns, or NULLs in an older database."""

    state: str
    attempt: str


_COLUMNS: Final = _Columns(_STATE_COLUMNS, _ATTEMPT_COLUMNS)


def _readable_columns(conn: sqlite3.Connection) -> _Columns:
    """A read-only handle cannot migrate: read an older database's rows as they are."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(recipients)")}
    if "last_status" in have:
        return _COLUMNS
    nulls = ", ".join(["NULL"] * 6)
    return _Columns(_STATE_COLUMNS.replace(_LAST_COLUMNS, nulls), nulls)


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns a database made by an older version lacks, and fill them in.

    Old rows only had the one-line text: it becomes ``text``, and the RFC 3463
    code in it (if any) ``status``, so those rows read and bounce as before.
    """
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns:
            if name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    for rcpt_id, status, error in conn.execute(
        "SELECT id, status, last_error FROM recipients"
        " WHERE last_error IS NOT NULL AND last_status IS NULL"
    ).fetchall():
        conn.execute(
            "UPDATE recipients SET last_status = ?, last_text = ? WHERE id = ?",
            (status_in(error) or _DEFAULT_STATUS.get(status, "4.0.0"), error, rcpt_id),
        )
    for attempt_id, kind, detail in conn.execute(
        "SELECT id, outcome, detail FROM attempts WHERE status IS NULL"
    ).fetchall():
        conn.execute(
            "UPDATE attempts SET status = ?, text = ? WHERE id = ?",
            (status_in(detail) or _DEFAULT_STATUS.get(kind, "4.0.0"), detail, attempt_id),
        )


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        is not None
    )


@contextmanager
def _errors(what: str) -> Iterator[None]:
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise QueueError(f"queue {what} failed: {exc}") from exc


class QueueStore:
    """One process's handle on the queue database (thread-safe)."""

    def __init__(
        self,
        path: Path,
        *,
        readonly: bool = False,
        busy_timeout: float = 10.0,
        recover: bool = False,
    ) -> None:
        """Open (creating if need be) the queue at `path`; QueueError in one line if unusable.

        A damaged database is salvaged into a fresh file when `recover` is set (the
        server at startup; the old file is kept beside it), refused otherwise.
        """
        self.path = Path(path)
        self.readonly = readonly
        self.files = BodyFiles(self.path)
        self.commits = 0  # every write transaction
        self.durable_commits = 0  # those committed with synchronous=FULL (one WAL fsync each)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._lease_lock = threading.Lock()
        self._leased: set[int] = set()
        self._sync = ""
        self._writer: sqlite3.Connection | None = None
        self._columns = _COLUMNS
        self._indexed = True  # False: a read-only look at a database older than schema 4
        problem = check_database(self.path, deep=recover)
        if problem is not None:
            if not recover or not problem.recoverable:
                raise QueueError(problem.message(recover=recover))
            kept = recover_database(self.path)
            log.warning(
                "queue.database_recovered",
                path=str(self.path),
                problem=problem.text,
                kept=str(kept),
            )
        with _errors("open"):
            if readonly:
                if not self.path.exists():
                    raise QueueError(f"no queue database at {self.path}")
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._reader = self._connect(uri, busy_timeout, uri=True)
                self._columns = _readable_columns(self._reader)
                self._indexed = _has_table(self._reader, "body_index")
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
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA}")
            _migrate(conn)
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            conn.execute("COMMIT")
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
        """Store messages under their IDs in ONE transaction, fsynced before returning.

        Spooled bodies are renamed into place (folders fsynced) first. Body files of
        messages deleted earlier are unlinked once this commit made the deletes durable.
        """
        spooled = [(mid, m.spooled) for mid, m in items if m.spooled is not None]
        with _errors("insert"):
            if spooled:
                gone = self.files.place(spooled)
                if gone:
                    log.warning("queue.spool_gone", ids=",".join(sorted(gone)))
                    items = [(mid, m) for mid, m in items if mid not in gone]
            with self._transaction("FULL") as conn:
                self._insert_rows(conn, items, now)
                doomed = [row[0] for row in conn.execute("SELECT message_id FROM doomed_bodies")]
                if doomed:
                    conn.executemany(
                        "DELETE FROM doomed_bodies WHERE message_id = ?", [(d,) for d in doomed]
                    )
        self.files.unlink(doomed)

    @staticmethod
    def _insert_rows(
        conn: sqlite3.Connection, items: Sequence[tuple[str, NewMessage]], now: float
    ) -> None:
        messages = []
        bodies = []
        index = []
        rcpts = []
        for message_id, msg in items:
            messages.append(
                (
                    message_id,
                    msg.sender,
                    now,
                    msg.size,
                    json.dumps(dict(msg.meta)),
                    msg.ret,
                    msg.envid,
                )
            )
            if msg.spooled is None:
                bodies.append((message_id, msg.data))
                index.append((message_id, b"", 0, len(msg.data), crc_of(msg.data)))
            else:
                index.append((message_id, msg.data, 1, msg.spooled.size, msg.spooled.crc))
            for r in msg.recipients:
                rcpts.append(
                    (
                        message_id,
                        r.address,
                        r.original,
                        r.mailbox,
                        r.mailbox is not None,
                        now,
                        now,
                        _notify_text(r.notify),
                        r.orcpt,
                    )
                )
        conn.executemany(
            "INSERT INTO messages (id, sender, received_at, size, meta, ret, envid)"
            " VALUES (?,?,?,?,?,?,?)",
            messages,
        )
        conn.executemany("INSERT INTO bodies (message_id, data) VALUES (?,?)", bodies)
        conn.executemany(
            "INSERT INTO body_index (message_id, head, in_file, size, crc) VALUES (?,?,?,?,?)",
            index,
        )
        conn.executemany(
            "INSERT INTO recipients (message_id, address, original, mailbox, local, status,"
            " next_attempt, updated_at, notify, orcpt) VALUES (?,?,?,?,?,'pending',?,?,?,?)",
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
                    " m.sender, r.attempts, m.received_at, r.notify, r.orcpt, m.ret, m.envid"
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
                (
                    _,
                    message_id,
                    rcpt_id,
                    address,
                    original,
                    mailbox,
                    sender,
                    attempts,
                    received_at,
                    notify,
                    orcpt,
                    ret,
                    envid,
                ) = row
                out.append(
                    DueRecipient(
                        message_id,
                        rcpt_id,
                        address,
                        original,
                        mailbox,
                        sender,
                        attempts,
                        received_at,
                        _notify_of(notify),
                        orcpt,
                        ret,
                        envid,
                    )
                )
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
        """The stored message; KeyError when it is gone (deleted, purged or damaged)."""
        return self.bodies([message_id])[message_id].read()

    def data_many(self, message_ids: Sequence[str]) -> dict[str, bytes]:
        """Bodies of several messages in memory (missing and damaged ones are left out)."""
        return {mid: body.read() for mid, body in self.bodies(message_ids).items()}

    def bodies(self, message_ids: Sequence[str]) -> dict[str, StoredBody]:
        """Bodies of several messages in one pass; missing and damaged ones are left out.

        A body that cannot be read back as stored (an unreadable database page, a
        body file missing, short or altered) is logged and set aside, so one bad
        message never stops the others. File bodies are checked here and read by
        delivery in pieces.
        """
        ids = list(dict.fromkeys(message_ids))
        rows: dict[str, tuple[Any, ...]] = {}
        damaged: dict[str, str] = {}
        sql = (
            "SELECT m.id, i.head, i.in_file, i.size, i.crc, b.data FROM messages m"
            " LEFT JOIN body_index i ON i.message_id = m.id"
            " LEFT JOIN bodies b ON b.message_id = m.id WHERE m.id IN ({})"
        )
        if not self._indexed:
            sql = (
                "SELECT m.id, NULL, NULL, NULL, NULL, b.data FROM messages m"
                " LEFT JOIN bodies b ON b.message_id = m.id WHERE m.id IN ({})"
            )
        with _errors("read"), self._read() as conn:
            for part in _chunks(ids):
                try:
                    found = conn.execute(sql.format(_marks(len(part))), tuple(part)).fetchall()
                except sqlite3.DatabaseError:
                    found = []
                    for mid in part:  # find which message the damage is in
                        try:
                            found += conn.execute(sql.format("?"), (mid,)).fetchall()
                        except sqlite3.DatabaseError as exc:
                            damaged[mid] = f"database page unreadable: {exc}"
                rows.update((row[0], row) for row in found)
        out: dict[str, StoredBody] = {}
        for mid, (_, head, in_file, size, crc, blob) in rows.items():
            try:
                out[mid] = self._body(mid, head, in_file, size, crc, blob)
            except BodyDamaged as exc:
                damaged[mid] = str(exc)
        if damaged:
            self._set_aside(damaged)
        return out

    def _body(
        self,
        message_id: str,
        head: bytes | None,
        in_file: int | None,
        size: int | None,
        crc: int | None,
        blob: bytes | None,
    ) -> StoredBody:
        if head is None or in_file is None or size is None or crc is None:
            if blob is None:
                raise BodyDamaged("no body stored")
            return StoredBody(bytes(blob))  # written before schema 3: nothing to check
        if in_file:
            path = self.files.verify(message_id, size, crc)
            return StoredBody(bytes(head), path, size)
        if blob is None:
            raise BodyDamaged("inline body row is missing")
        data = bytes(blob)
        if len(data) != size or crc_of(data) != crc:
            raise BodyDamaged("inline body does not match its size and checksum")
        return StoredBody(data)

    def _set_aside(self, damaged: Mapping[str, str]) -> None:
        """Keep damaged messages, logged and listed, out of delivery until the next flush."""
        for mid, reason in damaged.items():
            log.error("queue.damaged", id=mid, reason=reason)
        if self._writer is None:
            return
        now = time.time()
        try:
            with self._transaction("NORMAL") as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO damaged (message_id, reason, at) VALUES (?,?,?)",
                    [(mid, reason, now) for mid, reason in damaged.items()],
                )
                conn.executemany(
                    "UPDATE recipients SET next_attempt = ? WHERE message_id = ?"
                    " AND status IN ('pending', 'deferred')",
                    [(SET_ASIDE_UNTIL, mid) for mid in damaged],
                )
        except sqlite3.Error as exc:
            log.error("queue.set_aside_failed", messages=len(damaged), error=str(exc))

    def damaged(self) -> dict[str, str]:
        """Messages set aside as damaged, with the reason; {} when that cannot be read."""
        try:
            with self._read() as conn:
                return dict(conn.execute("SELECT message_id, reason FROM damaged").fetchall())
        except sqlite3.Error:
            return {}

    def sweep(self) -> int:
        """Server startup only: remove spool leftovers and body files no row names."""
        with _errors("sweep"):
            self.files.ensure_spool()
            with self._read() as conn:
                known = {
                    row[0]
                    for row in conn.execute("SELECT message_id FROM body_index WHERE in_file")
                }
            removed = self.files.sweep(known)
            if self._writer is not None:
                with self._transaction("NORMAL") as conn:
                    conn.execute("DELETE FROM doomed_bodies")
        return removed

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
                " next_attempt = COALESCE(?, next_attempt), last_error = ?, updated_at = ?,"
                " last_code = ?, last_status = ?, last_text = ?, last_host = ?,"
                " last_address = ?, last_stage = ?,"
                # RFC 3461 §6.2: a success DSN is owed for NOTIFY=SUCCESS unless the
                # next hop took the request over.
                " notice = CASE WHEN ? AND (',' || notify || ',') LIKE '%,SUCCESS,%'"
                "  THEN CASE WHEN local THEN 'delivered' WHEN ? THEN NULL ELSE 'relayed' END"
                "  END WHERE id = ?",
                [_recipient_row(u, now) for u in updates],
            )
            # INSERT ... SELECT skips recipients deleted meanwhile (`queue delete`).
            conn.executemany(
                "INSERT INTO attempts (rcpt_id, at, outcome, detail, code, status, text, host,"
                " address, stage) SELECT id, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM recipients"
                " WHERE id = ?",
                [
                    (now, u.status, u.outcome.detail, *_outcome_columns(u.outcome), u.rcpt_id)
                    for u in updates
                ],
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
                "SELECT 1 FROM recipients WHERE message_id = ?"
                " AND (status != 'delivered' OR notice IS NOT NULL) LIMIT 1",
                (mid,),
            ).fetchone()
            is None
        ]
        _delete_messages(conn, done)

    def mark_delivered(self, rcpt_ids: Sequence[int], *, now: float, outcome: Outcome) -> None:
        self.update([RecipientUpdate(i, outcome) for i in rcpt_ids], now=now)

    def defer(self, rcpt_id: int, *, now: float, next_attempt: float, outcome: Outcome) -> None:
        self.update([RecipientUpdate(rcpt_id, outcome, next_attempt)], now=now)

    def fail(self, rcpt_id: int, *, now: float, outcome: Outcome) -> None:
        self.update([RecipientUpdate(rcpt_id, outcome)], now=now)

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
        """Finished messages with failed recipients, or success DSNs owed, not reported yet.

        One report per message (RFC 3464 reports all its recipients together), so a
        message waits until every recipient is delivered or failed.
        """
        with _errors("read"), self._read() as conn:
            conn.execute("BEGIN")
            try:
                rows = conn.execute(
                    "SELECT m.id, m.sender, m.received_at, m.ret, m.envid FROM messages m"
                    " WHERE m.id IN (SELECT DISTINCT message_id FROM recipients"
                    "                WHERE status = 'failed' OR notice IS NOT NULL)"
                    " AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                    "                 AND r.status IN ('pending', 'deferred'))"
                    " ORDER BY m.received_at LIMIT ?",
                    (limit,),
                ).fetchall()
                found = []
                for message_id, sender, received_at, ret, envid in rows:
                    failed = tuple(
                        FailedRecord(
                            address,
                            original,
                            _outcome("failed", fields),
                            updated_at,
                            _notify_of(notify),
                            orcpt,
                        )
                        for address, original, updated_at, notify, orcpt, *fields in conn.execute(
                            "SELECT address, original, updated_at, notify, orcpt, "
                            + _LAST_COLUMNS
                            + " FROM recipients WHERE message_id = ? AND status = 'failed'"
                            " ORDER BY id",
                            (message_id,),
                        )
                    )
                    notices = tuple(
                        NoticeRecord(*row)
                        for row in conn.execute(
                            "SELECT address, original, notice, updated_at, orcpt FROM recipients"
                            " WHERE message_id = ? AND status = 'delivered'"
                            " AND notice IS NOT NULL ORDER BY id",
                            (message_id,),
                        )
                    )
                    found.append((message_id, sender, received_at, failed, notices, ret, envid))
            finally:
                conn.execute("COMMIT")
        bodies = self.bodies([row[0] for row in found])  # outside the read lock: it takes it
        return [
            FinishedMessage(
                mid, sender, received_at, bodies[mid].read(), failed, notices, ret, envid
            )
            for mid, sender, received_at, failed, notices, ret, envid in found
            if mid in bodies
        ]

    def delay_candidates(self, older_than: float, limit: int = 20) -> list[DelayedMessage]:
        """Messages with recipients that asked for NOTIFY=DELAY, still unfinished, received
        before ``older_than`` and not warned yet (one delay DSN per recipient)."""
        with _errors("read"), self._read() as conn:
            conn.execute("BEGIN")
            try:
                rows = conn.execute(
                    "SELECT r.message_id, m.sender, m.received_at, m.envid, r.id, r.address,"
                    " r.original, r.updated_at, r.orcpt, r.attempts, "
                    + _LAST_COLUMNS
                    + " FROM recipients r JOIN messages m ON m.id = r.message_id"
                    " WHERE r.status IN ('pending', 'deferred') AND NOT r.warned"
                    " AND (',' || r.notify || ',') LIKE '%,DELAY,%' AND m.received_at <= ?"
                    " ORDER BY m.received_at, r.id LIMIT ?",
                    (older_than, limit * 50),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        grouped: dict[str, tuple[str, float, str | None, list[DelayedRecord]]] = {}
        for (
            mid,
            sender,
            received_at,
            envid,
            rcpt_id,
            address,
            original,
            updated_at,
            orcpt,
            attempts,
            *fields,
        ) in rows:
            if mid not in grouped:
                if len(grouped) == limit:
                    continue
                grouped[mid] = (sender, received_at, envid, [])
            last = _outcome("deferred", fields) if attempts and fields[1] else None
            grouped[mid][3].append(
                DelayedRecord(rcpt_id, address, original, last, updated_at, orcpt)
            )
        bodies = self.bodies(list(grouped))
        return [
            DelayedMessage(mid, sender, received_at, bodies[mid].read(), tuple(records), envid)
            for mid, (sender, received_at, envid, records) in grouped.items()
            if mid in bodies
        ]

    def warned(
        self, rcpt_ids: Sequence[int], notice: tuple[str, NewMessage] | None, *, now: float
    ) -> None:
        """Queue the delay DSN and mark its recipients warned, in ONE fsynced step."""
        with _errors("warn"), self._transaction("FULL") as conn:
            if notice is not None:
                self._insert_rows(conn, [notice], now)
            conn.executemany(
                "UPDATE recipients SET warned = 1 WHERE id = ?", [(i,) for i in rcpt_ids]
            )

    def settle(self, message_id: str, bounce: tuple[str, NewMessage] | None, *, now: float) -> None:
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

        keep_failed=True keeps messages that still have a failed recipient or owe
        a success DSN (their report has not been queued yet).
        """
        finished = ("pending", "deferred", "failed") if keep_failed else UNFINISHED
        owed = " OR r.notice IS NOT NULL" if keep_failed else ""
        with _errors("purge"), self._transaction("NORMAL") as conn:
            done = conn.execute(
                "SELECT id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r"
                f" WHERE r.message_id = m.id AND (r.status IN ({_marks(len(finished))}){owed}))",
                finished,
            ).fetchall()
            _delete_messages(conn, done)
        return len(done)

    def list_messages(self) -> list[QueuedMessage]:
        """Messages with a recipient still pending or deferred, oldest first (SPEC §8)."""
        with _errors("list"), self._read() as conn:
            conn.execute("BEGIN")
            try:
                msgs = conn.execute(
                    "SELECT id, sender, received_at, size FROM messages m WHERE EXISTS"
                    " (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                    " AND r.status IN ('pending', 'deferred')) ORDER BY received_at, id"
                ).fetchall()
                rcpts = conn.execute(
                    f"SELECT message_id, {self._columns.state} FROM recipients WHERE message_id IN"
                    " (SELECT message_id FROM recipients WHERE status IN ('pending', 'deferred'))"
                    " ORDER BY id"
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        by_message: dict[str, list[RecipientState]] = {}
        for message_id, *row in rcpts:
            by_message.setdefault(message_id, []).append(_recipient_state(row))
        damaged = self.damaged()
        return [
            QueuedMessage(
                message_id,
                sender,
                received_at,
                size,
                tuple(by_message.get(message_id, ())),
                damaged=damaged.get(message_id),
            )
            for message_id, sender, received_at, size in msgs
        ]

    def show(self, message_id: str) -> QueuedMessage | None:
        """Everything about one message (also finished ones not yet purged)."""
        with _errors("show"), self._read() as conn:
            conn.execute("BEGIN")
            try:
                index = "i.head" if self._indexed else "NULL"
                msg = conn.execute(
                    "SELECT m.id, m.sender, m.received_at, m.size, m.meta,"
                    f" COALESCE(b.data, {index}) FROM messages m"
                    " LEFT JOIN bodies b ON b.message_id = m.id"
                    + (" LEFT JOIN body_index i ON i.message_id = m.id" if self._indexed else "")
                    + " WHERE m.id = ?",
                    (message_id,),
                ).fetchone()
                if msg is None:
                    return None
                rcpts = conn.execute(
                    f"SELECT id, {self._columns.state} FROM recipients WHERE message_id = ?"
                    " ORDER BY id",
                    (message_id,),
                ).fetchall()
                history = conn.execute(
                    f"SELECT a.rcpt_id, a.at, a.outcome, a.detail, {self._columns.attempt}"
                    " FROM attempts a"
                    " JOIN recipients r ON r.id = a.rcpt_id WHERE r.message_id = ?"
                    " ORDER BY a.id",
                    (message_id,),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        attempts_by_rcpt: dict[int, list[Attempt]] = {}
        for rcpt_id, at, kind, detail, *fields in history:
            if fields[1] is None:  # an older database's row: text only
                fields = [None, status_in(detail), detail, None, None, None]
            attempts_by_rcpt.setdefault(rcpt_id, []).append(
                Attempt(at, _outcome(kind, fields), detail)
            )
        mid, sender, received_at, size, meta, data = msg
        if data is not None and mid in self._file_bodies([mid]):
            data = bytes(data) + self.files.head_of(mid)
        return QueuedMessage(
            id=mid,
            sender=sender,
            received_at=received_at,
            size=size,
            recipients=tuple(
                _recipient_state(row, tuple(attempts_by_rcpt.get(rcpt_id, ())))
                for rcpt_id, *row in rcpts
            ),
            meta=json.loads(meta),
            headers=_header_section(bytes(data)) if data is not None else "",
            damaged=self.damaged().get(mid),
        )

    def _file_bodies(self, message_ids: Sequence[str]) -> set[str]:
        if not self._indexed:
            return set()
        with _errors("read"), self._read() as conn:
            return {
                row[0]
                for row in conn.execute(
                    f"SELECT message_id FROM body_index WHERE in_file"
                    f" AND message_id IN ({_marks(len(message_ids))})",
                    tuple(message_ids),
                )
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
