"""Key material a privilege-dropping parent read as root, for the workers it starts.

Once the parent has switched to ``user`` it can no longer read a key file
only root may read, and neither can the workers it starts (or restarts)
afterwards. So, before dropping root, the parent copies the TLS certificate,
its key and the users file into anonymous memory files (``memfd_create``):
no path, nothing on disk, only descriptors, which each worker inherits. A
worker reads them back through ``/proc/self/fd/N``, the path OpenSSL needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trio_mta.server.passwords import PasswordFile


def fd_path(fd: int) -> Path:
    return Path(f"/proc/self/fd/{fd}")


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    try:
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass
class SecretFds:
    """The parent's memory files; the same descriptors go to every worker it starts."""

    cert_fd: int
    key_fd: int
    users_fd: int | None = None
    users_signature: list[int] | None = None

    @classmethod
    def read(cls, cert: Path, key: Path, users_file: Path) -> SecretFds:
        """Copy the pair and the users file (if it exists) while still root."""
        cert_fd = _memfd("trio-mta-cert", cert.read_bytes())
        try:
            key_fd = _memfd("trio-mta-key", key.read_bytes())
        except BaseException:
            os.close(cert_fd)
            raise
        secrets = cls(cert_fd, key_fd)
        snapshot = PasswordFile(users_file).snapshot()
        if snapshot is not None:
            text, signature = snapshot
            secrets.users_fd = _memfd("trio-mta-users", text.encode("utf-8"))
            secrets.users_signature = list(signature)
        return secrets

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.cert_fd, self.key_fd) + (() if self.users_fd is None else (self.users_fd,))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


@dataclass(frozen=True)
class KeyMaterial:
    """A worker's view: paths OpenSSL can open, and the users file as root read it."""

    cert: Path
    key: Path
    users: tuple[str, tuple[int, int, int, int, int]] | None = None

    @classmethod
    def inherited(
        cls, cert_fd: int, key_fd: int, users_fd: int | None, users_signature: list[int] | None
    ) -> KeyMaterial:
        users = None
        if users_fd is not None and users_signature is not None:
            size = os.fstat(users_fd).st_size
            text = os.pread(users_fd, size, 0).decode("utf-8")
            os.close(users_fd)
            a, b, c, d, e = users_signature
            users = text, (a, b, c, d, e)
        return cls(fd_path(cert_fd), fd_path(key_fd), users)
