"""Checking the queue database before use, and salvaging a damaged one.

A damaged database must not stop all mail, nor crash-loop the server, nor be
taken silently for an empty queue. At open the file is checked (SQLite header,
``PRAGMA quick_check``). What fails is either *recoverable* (a valid header but
damaged pages, a truncated file): the server then copies out everything
readable into a fresh file, with the ``.recover`` command of the sqlite3 shell
when it is installed (it reads page by page, past damage) or else table by
table, and keeps the old file beside it as ``<name>.damaged-<time>``. Or it is
not (an empty file, something that is not SQLite at all): then opening fails
with one line that names the file and what to do, and nothing is deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

_HEADER = b"SQLite format 3\x00"
_RECOVER_TIMEOUT = 600.0  # seconds for the sqlite3 shell's .recover


@dataclass(frozen=True)
class Problem:
    text: str  # what is wrong, e.g. "is not an SQLite database"
    path: Path
    recoverable: bool

    def message(self, *, recover: bool) -> str:
        """The one line an operator reads: the file, what is wrong, what to do."""
        if self.recoverable and not recover:
            todo = "start the server (`trio-mta serve`) to recover it"
        else:
            todo = (
                "restore it from a backup, or move it aside (the mail in it is then lost)"
                " and start again with an empty queue"
            )
        return f"queue database {self.path} {self.text}: {todo}"


def check_database(path: Path, *, deep: bool = False) -> Problem | None:
    """None if `path` is absent (a new queue) or looks sound; else what is wrong.

    `deep` also runs ``PRAGMA quick_check``, which reads the whole file: the server
    does it once at startup; the `queue` commands only look at the header.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Problem(f"cannot be read ({exc.strerror or exc})", path, False)
    wal = Path(f"{path}-wal")
    if size == 0:
        if wal.exists() and wal.stat().st_size > 0:
            return _quick_check(path) if deep else None  # it may all be in the WAL
        return Problem("is empty (0 bytes), so its messages are gone", path, False)
    try:
        with open(path, "rb") as f:
            header = f.read(len(_HEADER))
    except OSError as exc:
        return Problem(f"cannot be read ({exc.strerror or exc})", path, False)
    if header != _HEADER:
        return Problem("is not an SQLite database", path, False)
    return _quick_check(path) if deep else None


def _quick_check(path: Path) -> Problem | None:
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            rows = conn.execute("PRAGMA quick_check(5)").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return Problem(f"is damaged ({exc})", path, True)
    except sqlite3.Error as exc:  # locked, read-only folder...: not damage
        return Problem(f"cannot be opened ({exc})", path, False)
    if rows != [("ok",)]:
        return Problem(f"is damaged ({'; '.join(str(r[0]) for r in rows)})", path, True)
    return None


def recover_database(path: Path) -> Path:
    """Salvage `path` into a fresh file in its place; returns where the old one is kept."""
    fresh = path.with_name(path.name + ".recovering")
    for leftover in (fresh, Path(f"{fresh}-journal")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    shell = shutil.which("sqlite3")
    if shell is None or not _recover_with_shell(shell, path, fresh):
        with contextlib.suppress(FileNotFoundError):
            fresh.unlink()
        source = path.with_name(path.name + ".salvage")
        try:
            _padded_copy(path, source)
            _recover_tables(source, fresh)
        finally:
            for leftover in (source, Path(f"{source}-wal"), Path(f"{source}-shm")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    kept = path.with_name(f"{path.name}.damaged-{stamp}")
    os.rename(path, kept)
    for suffix in ("-wal", "-shm"):
        old = Path(f"{path}{suffix}")
        if old.exists():
            os.rename(old, Path(f"{kept}{suffix}"))
    os.rename(fresh, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return kept


def _recover_with_shell(shell: str, path: Path, fresh: Path) -> bool:
    """The sqlite3 shell's page-level `.recover`, piped into a new database."""
    try:
        dump = subprocess.run(
            [shell, "-readonly", str(path), ".recover"],
            capture_output=True,
            timeout=_RECOVER_TIMEOUT,
            check=False,
        )
        if dump.returncode != 0 or not dump.stdout:
            return False
        load = subprocess.run(
            [shell, str(fresh)],
            input=dump.stdout,
            capture_output=True,
            timeout=_RECOVER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    if load.returncode != 0 or b"error" in dump.stderr.lower() or _quick_check(fresh) is not None:
        return False
    # Some builds of the shell print only the pragmas: a copy without our tables is no copy.
    try:
        conn = sqlite3.connect(fresh)
        try:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    return {"messages", "recipients"} <= names


def _padded_copy(path: Path, copy: Path) -> None:
    """Copy the database (and its WAL) with a truncated tail padded back with zeros.

    SQLite refuses the whole schema when a table's root page lies past the end of
    the file; padded, the pages that are left can be read again.
    """
    shutil.copyfile(path, copy)
    wal = Path(f"{path}-wal")
    if wal.exists():
        shutil.copyfile(wal, Path(f"{copy}-wal"))
    with open(copy, "r+b") as f:
        header = f.read(100)
        if len(header) < 100:
            return
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        f.seek(0, os.SEEK_END)
        if pages and f.tell() < pages * page_size:
            f.truncate(pages * page_size)


def _recover_tables(path: Path, fresh: Path) -> None:
    """Without the shell: copy each table's rows as far as they can be read."""
    src = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    dst = sqlite3.connect(fresh, isolation_level=None)
    try:
        try:
            schema = src.execute(
                "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL"
                " AND name NOT LIKE 'sqlite_%' ORDER BY type = 'table' DESC"
            ).fetchall()
        except sqlite3.DatabaseError:
            schema = []
        dst.execute("BEGIN")
        for _kind, _name, sql in schema:
            with contextlib.suppress(sqlite3.Error):
                dst.execute(sql)
        for kind, name, _sql in schema:
            if kind != "table":
                continue
            _copy_rows(src, dst, name)
        dst.execute("COMMIT")
    finally:
        src.close()
        dst.close()


def _copy_rows(src: sqlite3.Connection, dst: sqlite3.Connection, table: str) -> None:
    """Copy rows in rowid order; past an unreadable page, seek ever further ahead."""
    after = -(2**63)
    step = 1
    while True:
        try:
            cursor = src.execute(
                f'SELECT rowid, * FROM "{table}" WHERE rowid > ? ORDER BY rowid', (after,)
            )
            for row in cursor:  # one at a time: a bad row must not cost its neighbours
                marks = ",".join("?" * (len(row) - 1))
                dst.execute(f'INSERT OR IGNORE INTO "{table}" VALUES ({marks})', row[1:])
                after = row[0]
                step = 1
            return
        except sqlite3.DatabaseError:
            if after == -(2**63):
                after = 0
            after += step
            step *= 2
            if step > 2**48:
                return
