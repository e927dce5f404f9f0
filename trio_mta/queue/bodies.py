"""Message bodies on disk: one file per large message, beside the queue database.

Layout beside ``<state_dir>/queue.sqlite3``: ``spool/`` holds bodies still arriving (one
file per DATA in progress, named at random); at the end of DATA the fsynced
spool file is renamed to ``bodies/<xx>/<ID>`` (``xx``: two hex digits of the
ID's CRC-32, so no folder grows past a few thousand entries) and the folder is
fsynced before the index row that names it is committed. A body file is
therefore complete whenever a row points at it; a file without a row is a
leftover of a crash and :meth:`BodyFiles.sweep` removes it at startup.

Small bodies (up to the spool threshold) stay inline in the database, where
one group-commit fsync covers a whole batch; see docs/queue.md for why.
Every body, inline or file, carries its size and CRC-32 in the index, so
damage is found when the body is read and sets aside that one message.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trio_mta.safeio import fsync_directory

READ_CHUNK = 1 << 20


class BodyDamaged(Exception):
    """A body that cannot be read back as it was stored (missing, short, altered)."""


def crc_of(data: bytes, crc: int = 0) -> int:
    return zlib.crc32(data, crc)


@dataclass(frozen=True)
class SpooledBody:
    """A received body already written and fsynced to a spool file."""

    path: Path
    size: int
    crc: int


@dataclass(frozen=True)
class StoredBody:
    """A queued message as delivery reads it: ``head`` then, for large ones, a file.

    ``head`` is the whole message for inline bodies; for a file body it is the
    trace header section trio_mta prepended, and the file holds the client's data.
    """

    head: bytes
    path: Path | None = None
    file_size: int = 0

    @property
    def size(self) -> int:
        return len(self.head) + self.file_size

    def read(self) -> bytes:
        """The whole message in memory (remote delivery, bounces, handlers)."""
        if self.path is None:
            return self.head
        return b"".join(self.chunks())

    def chunks(self, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The message piece by piece, so a large body never sits in memory at once."""
        yield self.head
        if self.path is None:
            return
        with open(self.path, "rb") as f:
            while chunk := f.read(size):
                yield chunk


@dataclass(frozen=True)
class MessageContent:
    """A message as the session hands it to its sink: our trace headers, then the body."""

    head: bytes  # Received: (and for submission Date:/Message-ID:) we prepend
    body: bytes | SpooledBody

    @property
    def size(self) -> int:
        body = self.body
        return len(self.head) + (len(body) if isinstance(body, bytes) else body.size)

    def read(self) -> bytes:
        """The whole message in memory; blocking for a spooled body (use a thread)."""
        if isinstance(self.body, bytes):
            return self.head + self.body
        return StoredBody(self.head, self.body.path, self.body.size).read()


class BodyFiles:
    """Where body files and spool files live, and how they are placed and removed."""

    def __init__(self, database: Path) -> None:
        # One pair of folders per queue shard (queue/shards.py): queue.sqlite3 has
        # bodies/ and spool/, queue-2.sqlite3 has bodies-2/ and spool-2/.
        database = Path(database)
        stem = database.name.split(".", 1)[0]
        suffix = stem[len("queue") :] if stem.startswith("queue") else f"-{stem}"
        self.root = database.parent / f"bodies{suffix}"
        self.spool = database.parent / f"spool{suffix}"

    def path_for(self, message_id: str) -> Path:
        shard = f"{zlib.crc32(message_id.encode()) & 0xFF:02x}"
        return self.root / shard / message_id

    def ensure_spool(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)

    def place(self, items: Iterable[tuple[str, SpooledBody]]) -> set[str]:
        """Rename fsynced spool files to their body paths and fsync each folder once.

        Returns the IDs whose spool file is gone: their session gave up (cancelled
        before any reply) and removed it, so they must not be queued.
        """
        folders: set[Path] = set()
        gone: set[str] = set()
        for message_id, spooled in items:
            target = self.path_for(message_id)
            if not target.parent.is_dir():
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
                target.parent.mkdir(exist_ok=True, mode=0o700)
                folders.add(self.root)
            try:
                os.rename(spooled.path, target)
            except FileNotFoundError:
                gone.add(message_id)
                continue
            folders.add(target.parent)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            fsync_directory(folder)
        return gone

    def verify(self, message_id: str, size: int, crc: int) -> Path:
        """The body file of `message_id` if it is intact; BodyDamaged otherwise."""
        path = self.path_for(message_id)
        got_crc = 0
        got_size = 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(READ_CHUNK):
                    got_crc = zlib.crc32(chunk, got_crc)
                    got_size += len(chunk)
        except FileNotFoundError as exc:
            raise BodyDamaged(f"body file {path} is missing") from exc
        except OSError as exc:
            raise BodyDamaged(f"body file {path} cannot be read: {exc.strerror or exc}") from exc
        if got_size != size:
            raise BodyDamaged(f"body file {path} has {got_size} bytes, {size} were stored")
        if got_crc != crc:
            raise BodyDamaged(f"body file {path} does not match its checksum")
        return path

    def head_of(self, message_id: str, limit: int = 65536) -> bytes:
        """The first `limit` bytes of a body file (its header section), b"" if unreadable."""
        try:
            with open(self.path_for(message_id), "rb") as f:
                return f.read(limit)
        except OSError:
            return b""

    def unlink(self, message_ids: Iterable[str]) -> None:
        for message_id in message_ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path_for(message_id))

    def sweep(self, known: set[str]) -> int:
        """Remove spool leftovers and body files no index row names; returns how many.

        Only for the server at startup, before anything is received: a spool file
        or an uncommitted body file then belongs to a transaction that died.
        """
        removed = 0
        for folder, keep in ((self.spool, set()), *((d, known) for d in self._shards())):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(folder):
                    if entry.is_file(follow_symlinks=False) and entry.name not in keep:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                        removed += 1
        return removed

    def _shards(self) -> list[Path]:
        try:
            return [Path(e.path) for e in os.scandir(self.root) if e.is_dir()]
        except FileNotFoundError:
            return []
