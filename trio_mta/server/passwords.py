"""Submission passwords (RFC 4954 AUTH users) kept in a small scrypt password file.

File format: one ``user:encoded`` per line, ``#`` comments and blank lines
ignored, where ``encoded`` is ``scrypt$N$r$p$<b64 salt>$<b64 hash>``. The file
is re-read whenever it changes, so ``trio-mta passwd`` takes effect in a
running server without a reload signal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import trio

from trio_mta.safeio import replace_file

__all__ = [
    "PasswordFile",
    "check_password",
    "hash_password",
    "validate_username",
]

log = logging.getLogger(__name__)

SCHEME = "scrypt"
# n=2**14, r=8, p=1: the RFC 7914 §2 interactive-login figures (~50 ms, 16 MiB).
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**14, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32
# Bounds on parameters read from the file, so a corrupt or hostile line cannot make
# one AUTH attempt allocate gigabytes or spin for minutes.
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16


# --------------------------------------------------------------------- hashing


def _password_bytes(password: str) -> bytes:
    """NFKC first, the normalisation step of SASLprep (RFC 4013 §2.2), so that the
    same password typed as composed or decomposed characters matches. A password
    that cannot be encoded raises UnicodeEncodeError (a ValueError)."""
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # OpenSSL's memory check counts 128*r*(N+2) for V plus 128*r*p for B.
    maxmem = 128 * r * (n + 2 + p) + 65536
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Encode ``password`` as ``scrypt$16384$8$1$<b64salt>$<b64hash>`` with a fresh
    random salt unless one is given (tests only: a fixed salt defeats its purpose)."""
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(_password_bytes(password), salt, DEFAULT_N, DEFAULT_R, DEFAULT_P, HASH_BYTES)
    return f"{SCHEME}${DEFAULT_N}${DEFAULT_R}${DEFAULT_P}${_b64(salt)}${_b64(digest)}"


@dataclass(frozen=True, slots=True)
class _Encoded:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _parse(encoded: str) -> _Encoded:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError("not a scrypt$N$r$p$salt$hash string")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"malformed scrypt parameters: {exc}") from exc
    if not (2 <= n <= _MAX_N and n & (n - 1) == 0):
        raise ValueError(f"scrypt N={n} is not a power of two in 2..{_MAX_N}")
    if not (1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError(f"scrypt r={r} p={p} out of range")
    if not salt or len(digest) < 16:
        raise ValueError("scrypt salt or hash too short")
    return _Encoded(n, r, p, salt, digest)


def check_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded``; the comparison is constant-time.

    Raises ValueError when ``encoded`` is not a valid scrypt string, since that is
    a broken file, not a wrong password.
    """
    entry = _parse(encoded)
    try:
        candidate = _password_bytes(password)
    except UnicodeEncodeError:
        candidate = None
    # Run scrypt even for an unencodable password so its timing says nothing.
    digest = _scrypt(candidate or b"", entry.salt, entry.n, entry.r, entry.p, len(entry.digest))
    return candidate is not None and hmac.compare_digest(digest, entry.digest)


def _burn_time(password: str) -> None:
    """Spend what a real check costs, so an unknown user cannot be told apart from a
    wrong password by response time (no user enumeration)."""
    try:
        data = _password_bytes(password)
    except UnicodeEncodeError:
        data = b""
    _scrypt(data, b"\0" * SALT_BYTES, DEFAULT_N, DEFAULT_R, DEFAULT_P, HASH_BYTES)


# ------------------------------------------------------------------- usernames


def validate_username(username: str) -> None:
    """Raise ValueError unless ``username`` can be stored: non-empty, no ':' (the
    field separator), no whitespace, no control or other non-printing characters."""
    if not username:
        raise ValueError("a user name cannot be empty")
    for char in username:
        if char == ":" or char.isspace() or unicodedata.category(char).startswith("C"):
            raise ValueError(f"user name {username!r} contains {char!r}, which is not allowed")


def _is_valid_username(username: str) -> bool:
    try:
        validate_username(username)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------ the file


_Signature = tuple[int, int, int, int, int]


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class PasswordFile:
    """The users file of ``[auth].users_file``; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature: _Signature | None = None
        self._users: dict[str, str] = {}
        self._primed = False  # set by prime(): keep those users if the file becomes unreadable
        self._warned = False

    def snapshot(self) -> tuple[str, _Signature] | None:
        """The file's text and signature now (None when absent), for :meth:`prime`:
        read as root before a privilege drop, handed to worker processes."""
        try:
            st = os.stat(self.path)
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.error("cannot read %s: %s", self.path, exc)
            return None
        return text, _signature(st)

    def prime(self, text: str, signature: _Signature) -> None:
        """Use ``text`` as the file's contents until the file changes."""
        with self._lock:
            self._users = self._parse_file(text)
            self._signature = signature
            self._primed = True

    def _kept_after_drop(self, exc: OSError) -> dict[str, str] | None:
        """After a privilege drop the file may be root's alone: keep what root read."""
        if not isinstance(exc, PermissionError) or not self._primed:
            return None
        if not self._warned:
            self._warned = True
            log.warning(
                "cannot read %s (%s): using the users read at start until a restart",
                self.path,
                exc.strerror or exc,
            )
        return self._users

    def _current(self) -> dict[str, str]:
        """The users map, re-read when the file's identity, size or times changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            with self._lock:
                self._signature, self._users = None, {}
            return {}
        except OSError as exc:
            kept = self._kept_after_drop(exc)
            if kept is not None:
                return kept
            # Fail closed: nobody authenticates while the file cannot be read.
            log.error("cannot read %s: %s", self.path, exc.strerror or exc)
            return {}
        signature = _signature(st)
        with self._lock:
            if signature != self._signature:
                try:
                    text = self.path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    kept = self._kept_after_drop(exc) if isinstance(exc, OSError) else None
                    if kept is not None:
                        return kept
                    log.error("cannot read %s: %s", self.path, exc)
                    self._signature, self._users = None, {}
                    return {}
                self._users = self._parse_file(text)
                self._signature = signature
            return self._users

    def _parse_file(self, text: str) -> dict[str, str]:
        users: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            username, sep, encoded = line.partition(":")
            problem = None
            if not sep or not _is_valid_username(username):
                problem = "expected user:hash"
            else:
                try:
                    _parse(encoded)
                except ValueError as exc:
                    problem = str(exc)
            if problem is not None:
                log.warning("%s:%d ignored: %s", self.path, number, problem)
            elif username in users:
                # First entry wins, as in /etc/passwd and htpasswd lookups.
                log.warning("%s:%d ignored: duplicate user %s", self.path, number, username)
            else:
                users[username] = encoded
        return users

    def usernames(self) -> list[str]:
        """The users with a usable entry, in file order."""
        return list(self._current())

    def verify(self, username: str, password: str) -> bool:
        """Check a login. Runs scrypt: call it from a worker thread (``verify_async``)."""
        encoded = self._current().get(username)
        if encoded is None:
            _burn_time(password)
            return False
        return check_password(password, encoded)

    async def verify_async(
        self, username: str, password: str, *, limiter: trio.CapacityLimiter | None = None
    ) -> bool:
        """``verify`` in a worker thread; ``limiter`` bounds concurrent scrypt runs,
        which each take ~50 ms of CPU and 16 MiB, so a flood of AUTH attempts queues
        instead of exhausting memory."""
        return await trio.to_thread.run_sync(self.verify, username, password, limiter=limiter)

    def set_password(self, username: str, password: str) -> None:
        """Add or replace ``username``'s password. Comments and other lines are kept;
        the file is replaced atomically (tmp + fsync + rename, mode 0600) so a running
        server never reads half a file."""
        validate_username(username)
        if not password:
            raise ValueError("a password cannot be empty")
        if "\0" in password:
            # RFC 4616 §2: PLAIN's passwd excludes NUL, so it could never log in.
            raise ValueError("a password cannot contain NUL")
        entry = f"{username}:{hash_password(password)}"
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        out: list[str] = []
        replaced = False
        for line in lines:
            stripped = line.strip()
            if not stripped.startswith("#") and stripped.partition(":")[0] == username:
                if not replaced:
                    out.append(entry)
                    replaced = True
                continue  # later duplicates would be ignored anyway; drop them
            out.append(line)
        if not replaced:
            out.append(entry)
        self._write("".join(f"{line}\n" for line in out).encode("utf-8"))

    def _write(self, data: bytes) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            old = os.stat(self.path)
        except FileNotFoundError:
            owner = None
        else:
            # Keep the owner, so root running `passwd` does not lock out a
            # server that runs as its own user; only root may do this.
            owner = (old.st_uid, old.st_gid)
        replace_file(self.path, data, mode=0o600, owner=owner)
