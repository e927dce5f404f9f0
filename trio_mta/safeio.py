"""Durable file writes: write to a temporary name, fsync, rename, fsync the directory.

A reader sees the old file or the whole new one, never a torn one, and after a crash the
rename is either on disk or not at all (the directory fsync makes the new entry durable).
One implementation for every writer: the password file and the generated certificate
replace one file in place (:func:`replace_file`); Maildir delivery writes many files into
``new/`` and fsyncs each folder once per batch, so :func:`write_file_durably` can leave the
directory fsync to the caller (:func:`fsync_directory`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["fsync_directory", "replace_file", "write_file_durably"]

# O_EXCL: a temporary name is never shared, and never a symlink planted in advance.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


def fsync_directory(path: Path) -> None:
    """Make the entries of *path* (a rename into it, a new file) survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(
    tmp: Path,
    final: Path,
    chunks: Iterable[bytes],
    *,
    mode: int = 0o600,
    fsync_dir: bool = True,
    owner: tuple[int, int] | None = None,
    make_target_dir: Callable[[], None] | None = None,
) -> None:
    """Write *chunks* to the new file *tmp*, fsync it, rename it to *final*.

    *tmp* must not exist (``FileExistsError``, nothing written: pick another name) and its
    folder must (``FileNotFoundError``, nothing written). The file gets *mode* exactly, whatever
    the umask; *owner* ``(uid, gid)`` is applied when the process may (root keeping a file's
    owner). If the rename finds *final*'s folder missing, *make_target_dir* (if given) is
    called and the rename tried once more. On any failure *tmp* is removed. With *fsync_dir*
    false the caller fsyncs ``final.parent`` itself, once for many files.
    """
    fd = os.open(tmp, _NEW_FILE, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits we want (0644 cert)
            if owner is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, *owner)
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:
            if make_target_dir is None:
                raise
            make_target_dir()
            os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync_dir:
        fsync_directory(final.parent)


def replace_file(
    path: Path, data: bytes, *, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> None:
    """Atomically replace (or create) *path* with *data*; its folder must exist.

    The temporary file is a hidden, unique sibling, so the rename never crosses filesystems.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    write_file_durably(tmp, path, (data,), mode=mode, owner=owner)
