"""Local delivery into Maildir (SPEC §5 "Maildir").

Each file is written under tmp/ with a unique name, fsynced, renamed into new/,
and new/ is fsynced: a reader never sees a partial file, and after a crash a file
is either in new/ or not at all. To keep fsyncs cheap under load, a batch writes
its files from several worker threads at once and fsyncs each distinct new/
folder once, after all its files are in; only then is anything reported
delivered. Content is "Return-Path:" and "Delivered-To:" followed by the message
with LF line ends, the form Postfix's local(8) and Dovecot's LDA write. A large
body (a file in the queue) is copied in pieces, so delivery holds no more of it
in memory than one piece per worker thread.

Modes: a Maildir is private to trio_mta's user (folders 0700, files 0600)
unless ``group`` is given (``[local] maildir_group``), for a mail store such as
Dovecot that reads it as another user of that group: folders are then 02770
(the setgid bit makes everything created inside, by us or by Dovecot, inherit
the group) and files 0660, group-owned. Modes are set explicitly, whatever
the umask. Only folders this agent creates get them: existing ones are left
as they are (docs/dovecot.md says how to fix them once).
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import trio

from trio_mta.delivery.agent import DeliveryItem
from trio_mta.delivery.outcome import Kind, Outcome
from trio_mta.queue.bodies import StoredBody
from trio_mta.routing.mailmap import safe_mailbox_name
from trio_mta.safeio import fsync_directory, write_file_durably

_NAME_ATTEMPTS = 8


class UnsafeMailbox(ValueError):
    """A mailbox name that is a path, or that resolves outside the Maildir root."""


def safe_join(root: Path, name: str) -> Path:
    """`root/name`, refusing names and symlinks that would lead outside `root`.

    The name rule is routing's (:func:`~trio_mta.routing.mailmap.safe_mailbox_name`), checked
    again here because the queue may hold mail accepted under an older configuration
    (SPEC §3: a mailbox name is never a path); the symlink check is what only delivery,
    which touches the filesystem, can do.
    """
    try:
        path = root / safe_mailbox_name(name)
    except ValueError as exc:
        raise UnsafeMailbox(f"invalid mailbox name {name!r}: {exc}") from None
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.dirname(real) != real_root:
        raise UnsafeMailbox(f"mailbox {name!r} resolves outside the Maildir root")
    return path


def escape_host(hostname: str) -> str:
    """Host part of a Maildir name: "/" and ":" are escaped as the convention says."""
    return hostname.replace("/", "\\057").replace(":", "\\072")


def lf_chunks(body: StoredBody) -> Iterator[bytes]:
    """The message with CRLF turned into LF, piece by piece (a CR may end a piece)."""
    carry = b""
    for chunk in body.chunks():
        chunk = carry + chunk
        carry = b"\r" if chunk.endswith(b"\r") else b""
        if carry:
            chunk = chunk[:-1]
        yield chunk.replace(b"\r\n", b"\n")
    if carry:
        yield carry


def _ensure_dir(path: Path, group: int | None = None) -> None:
    """mkdir (parents too), 0700 or 02770 in ``group``; fsyncs each parent that changed."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    except FileNotFoundError:
        if path.parent == path:
            raise
        _ensure_dir(path.parent, group)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
    if group is not None:
        try:
            # Group first, then open it up: never a moment when the wrong group has access.
            os.chown(path, -1, group)
            os.chmod(path, 0o2770)
        except OSError:
            # Not left behind with the wrong group: the next attempt makes it again.
            os.rmdir(path)
            raise
    # The new entry must survive a crash, or new/ could vanish with mail in it.
    fsync_directory(path.parent)


def _make_maildir(maildir: Path, group: int | None = None) -> None:
    # tmp/ last: a concurrent writer that finds tmp/ can count on new/ being there.
    for sub in ("new", "cur", "tmp"):
        _ensure_dir(maildir / sub, group)


def _write_error(mailbox: str, exc: OSError) -> Outcome:
    """RFC 3463 codes: 4.2.2 mailbox full, 4.3.1 system full, 4.3.0 system, 4.2.0 mailbox."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EDQUOT:
        return _local("deferred", "4.2.2", f"mailbox {mailbox} over quota: {reason}")
    if exc.errno == errno.ENOSPC:
        return _local("deferred", "4.3.1", f"mail system full: {reason}")
    if exc.errno in (errno.EROFS, errno.EIO):
        return _local("deferred", "4.3.0", f"mail system error writing to {mailbox}: {reason}")
    return _local("deferred", "4.2.0", f"cannot deliver to mailbox {mailbox}: {reason}")


def _local(kind: Kind, status: str, text: str) -> Outcome:
    return Outcome(kind, status, text, stage="local")


class MaildirAgent:
    """DeliveryAgent for local mailboxes under `root`."""

    def __init__(
        self, root: Path, hostname: str, *, limiter: trio.CapacityLimiter, group: int | None = None
    ) -> None:
        self.root = Path(root)
        self.hostname = hostname
        self.group = group
        self.files_synced = 0  # for tests and the benchmark's fsync accounting
        self.dirs_synced = 0
        self._host = escape_host(hostname)
        self._limiter = limiter
        self._counter = itertools.count(1)
        self._pid = os.getpid()

    async def deliver(self, items: Sequence[DeliveryItem]) -> list[Outcome]:
        outcomes: list[Outcome] = [_local("deferred", "4.3.0", "not attempted")] * len(items)
        placed: list[Path | None] = [None] * len(items)  # new/ folder of each written file
        lf_bodies: dict[str, bytes] = {}
        # Each mailbox is resolved (realpath: several stat calls) once per batch,
        # not once per file; dict updates are atomic under the GIL.
        maildirs: dict[str, Path | UnsafeMailbox] = {}
        workers = max(1, min(len(items), int(self._limiter.total_tokens)))

        async def write_share(first: int) -> None:
            def work() -> None:
                for i in range(first, len(items), workers):
                    outcomes[i], placed[i] = self._write(items[i], lf_bodies, maildirs)

            await trio.to_thread.run_sync(work, limiter=self._limiter)

        async with trio.open_nursery() as nursery:
            for first in range(workers):
                nursery.start_soon(write_share, first)

        folders = {folder for folder in placed if folder is not None}
        self.files_synced += sum(folder is not None for folder in placed)

        async def sync_folder(folder: Path) -> None:
            try:
                await trio.to_thread.run_sync(fsync_directory, folder, limiter=self._limiter)
                self.dirs_synced += 1
            except OSError as exc:
                # The file is in new/ but not durably: retry later (maybe a duplicate).
                for i, where in enumerate(placed):
                    if where == folder:
                        outcomes[i] = _write_error(folder.parent.name, exc)

        async with trio.open_nursery() as nursery:
            for folder in folders:
                nursery.start_soon(sync_folder, folder)
        return outcomes

    def _write(
        self,
        item: DeliveryItem,
        lf_bodies: dict[str, bytes],
        maildirs: dict[str, Path | UnsafeMailbox],
    ) -> tuple[Outcome, Path | None]:
        """Worker thread: deliver one file; returns its outcome and new/ folder."""
        rcpt = item.rcpt
        if rcpt.mailbox is None:
            return _local("failed", "5.3.5", "not a local mailbox"), None
        maildir = maildirs.get(rcpt.mailbox)
        if maildir is None:
            try:
                maildir = safe_join(self.root, rcpt.mailbox)
            except UnsafeMailbox as exc:
                maildir = exc
            maildirs[rcpt.mailbox] = maildir
        if isinstance(maildir, UnsafeMailbox):
            return _local("failed", "5.3.5", str(maildir)), None
        stored = item.stored
        body: Iterable[bytes]
        if stored.path is None:  # small: converted once per message and batch
            lf = lf_bodies.get(rcpt.message_id)
            if lf is None:
                lf = lf_bodies[rcpt.message_id] = stored.head.replace(b"\r\n", b"\n")
            body = (lf,)
        else:
            body = lf_chunks(stored)
        head = f"Return-Path: <{rcpt.sender}>\nDelivered-To: {rcpt.address}\n".encode()
        try:
            name = self._place(maildir, head, body)
        except OSError as exc:
            return _write_error(rcpt.mailbox, exc), None
        return _local("delivered", "2.0.0", f"delivered to maildir {rcpt.mailbox} as {name}"), (
            maildir / "new"
        )

    def _unique_name(self) -> str:
        seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
        return f"{seconds}.M{nanos // 1000}P{self._pid}Q{next(self._counter)}.{self._host}"

    def _place(self, maildir: Path, head: bytes, body: Iterable[bytes]) -> str:
        """tmp/NAME, fsynced, renamed to new/NAME; the caller fsyncs new/ once per batch."""
        created = False
        for _ in range(_NAME_ATTEMPTS):
            name = self._unique_name()
            try:
                write_file_durably(
                    maildir / "tmp" / name,
                    maildir / "new" / name,
                    _prepend(head, body),
                    mode=0o600 if self.group is None else 0o660,
                    fsync_dir=False,
                    owner=None if self.group is None else (-1, self.group),
                    # tmp/ existed but new/ did not (made by hand, or half-made by a
                    # concurrent delivery): complete the Maildir and rename once more.
                    make_target_dir=lambda: _make_maildir(maildir, self.group),
                )
            except FileExistsError:
                continue
            except FileNotFoundError:
                if created:
                    raise
                _make_maildir(maildir, self.group)
                created = True
                continue
            return name
        raise FileExistsError(errno.EEXIST, "no unique file name in tmp/", str(maildir))


def _prepend(head: bytes, body: Iterable[bytes]) -> Iterator[bytes]:
    yield head
    yield from body
