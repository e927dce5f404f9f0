"""Where each worker's queue lives, and which worker delivers which shard (SPEC §12).

Shard 0 is ``<state_dir>/queue.sqlite3``, the file a one-process server has
always used, so moving between ``workers = 1`` and more needs no migration;
shard K > 0 is ``<state_dir>/queue-K.sqlite3``. Worker K of N accepts into
shard K and also drains every existing shard J > K with J ≡ K (mod N): when
the worker count shrinks, the shards nobody accepts into any more are still
delivered. Shards are never merged or deleted: an empty one costs a file.

A lock file beside each shard (``flock``) keeps two processes from delivering
the same shard at once, which would be duplicates, not losses: a worker
orphaned by a killed parent may still be finishing while its successor starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path

_SHARD = re.compile(r"queue(?:-([1-9][0-9]*))?\.sqlite3")


def shard_path(state_dir: Path, index: int) -> Path:
    return state_dir / ("queue.sqlite3" if index == 0 else f"queue-{index}.sqlite3")


def existing_shards(state_dir: Path) -> list[tuple[int, Path]]:
    """(index, path) of every shard file in ``state_dir``, by index."""
    found: list[tuple[int, Path]] = []
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return []
    for name in names:
        match = _SHARD.fullmatch(name)
        if match:
            found.append((int(match.group(1) or 0), state_dir / name))
    return sorted(found)


def drained_by(state_dir: Path, worker: int, workers: int) -> list[int]:
    """Shards other than its own that worker ``worker`` of ``workers`` delivers."""
    return [
        index
        for index, _ in existing_shards(state_dir)
        if index > worker and index % workers == worker
    ]


class ShardLock:
    """An exclusive ``flock`` on ``<shard>.lock``, held while a process delivers the shard."""

    def __init__(self, shard: Path) -> None:
        self.path = shard.with_name(shard.name + ".lock")
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock without waiting; False when another process holds it.

        Callers that must wait poll this from trio: a blocking ``flock`` in a
        thread could not be cancelled by a stop request.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
