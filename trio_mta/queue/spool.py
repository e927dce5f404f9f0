"""A message body while it arrives: memory up to a threshold, then a spool file.

Each DATA/BDAT transaction gets one :class:`Spool`. Bytes stay in memory until
``threshold`` of them are waiting; then they are appended to a file in
``<state_dir>/spool/`` by a worker thread (the event loop never waits on the
disk), so a session holds at most about twice the threshold however large the
message is. At the end of DATA :meth:`finish` writes the rest and fsyncs the
file, again in a thread and in parallel with other sessions, which leaves the
queue's group commit only a rename and an index row per message. A refused,
reset or abandoned transaction calls :meth:`discard`, which removes the file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import trio

from trio_mta.queue.bodies import SpooledBody, crc_of

DEFAULT_THRESHOLD = 64 * 1024
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


class Spool:
    """One body being received; see the module doc."""

    def __init__(
        self,
        directory: os.PathLike[str] | str,
        *,
        threshold: int = DEFAULT_THRESHOLD,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.directory = os.fspath(directory)
        self.threshold = threshold
        self.size = 0
        self.first = b""  # once spooled: the first bytes, where header checks look
        self._limiter = limiter
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._fd: int | None = None
        self._path: str | None = None
        self._crc = 0
        self.error: OSError | None = None

    @property
    def spooled(self) -> bool:
        return self._path is not None

    async def write(self, data: bytes) -> None:
        """Take the next piece; a disk error is kept for :meth:`finish` (DATA must go on)."""
        self.size += len(data)
        if self.error is not None:
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= self.threshold:
            try:
                await self._flush()
            except OSError as exc:
                self.error = exc
                self.discard()

    async def finish(self) -> bytes | SpooledBody:
        """The body: bytes when it stayed small, else the fsynced spool file.

        Raises OSError when the spool could not be written (the caller answers 451).
        """
        if self.error is not None:
            raise self.error
        if self._path is None:
            data = b"".join(self._pending)
            self._pending = []
            return data
        await self._flush()
        await trio.to_thread.run_sync(self._sync_and_close, limiter=self._limiter)
        return SpooledBody(Path(self._path), self.size, self._crc)

    def discard(self) -> None:
        """Forget the body and remove its spool file (refused, reset or lost transaction)."""
        self._pending = []
        self._pending_size = 0
        self.first = b""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = None

    def release(self) -> None:
        """The queue took the spool file (renamed it): nothing is left to remove."""
        self._path = None

    async def _flush(self) -> None:
        chunk = b"".join(self._pending)
        self._pending = []
        self._pending_size = 0
        if self._path is None:
            self.first = chunk[: self.threshold]
        if chunk or self._path is None:
            await trio.to_thread.run_sync(self._append, chunk, limiter=self._limiter)

    def _append(self, chunk: bytes) -> None:
        """Worker thread: open the spool file on first use and append `chunk`."""
        if self._fd is None:
            path = os.path.join(self.directory, secrets.token_hex(12))
            self._fd = os.open(path, _FLAGS, 0o600)
            self._path = path
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view) :]
        self._crc = crc_of(chunk, self._crc)

    def _sync_and_close(self) -> None:
        assert self._fd is not None
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
