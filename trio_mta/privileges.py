"""Dropping root (SPEC §11): bind and read key files as root, then become ``user``.

Started as root with ``user = "trio-mta"``, every server process does, in this
order: create ``state_dir`` and ``maildir_root`` owned by that user (or check
that existing ones are writable by it), read what only root may read (the
TLS pair, the users file), bind the listeners, then :func:`drop`:
supplementary groups, group, user (``initgroups``/``setgroups``, ``setresgid``,
``setresuid``: the group must change while we still may change it), and
check that root cannot be regained. Only then is the first connection
accepted, and only then are the queue files opened, so they belong to the
user too. A ``[server] workers`` parent drops before it starts any worker;
workers receive the key material it read (:mod:`trio_mta.workers.secrets`).

The checks read modes and owners instead of calling ``access(2)``, which
would answer for root.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from trio_mta import log
from trio_mta.config import Config, ConfigError


@dataclass(frozen=True)
class Identity:
    """The account to become: ``user`` and its group (``group`` or the user's own)."""

    user: str
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def owner(self) -> tuple[int, int]:
        return self.uid, self.gid


def target_identity(config: Config) -> Identity | None:
    """The identity to switch to: None unless ``user`` is set and we run as root.

    Without root there is nothing to drop (a warning says ``user`` had no
    effect); running as root without ``user`` is allowed but warned about.
    """
    if os.geteuid() != 0:
        if config.user is not None and pwd.getpwuid(os.geteuid()).pw_name != config.user:
            log.warning(
                "privileges.not_root",
                user=config.user,
                running_as=os.geteuid(),
                effect="user ignored: only root can switch users",
            )
        return None
    if config.user is None:
        log.warning(
            "privileges.running_as_root",
            hint='set user = "trio-mta" (top level) to drop root after binding',
        )
        return None
    # The loader checked both names; they can only have vanished since.
    try:
        entry = pwd.getpwnam(config.user)
    except KeyError:
        raise ConfigError(f"user: no such user {config.user!r} any more") from None
    try:
        gid = entry.pw_gid if config.group is None else grp.getgrnam(config.group).gr_gid
    except KeyError:
        raise ConfigError(f"group: no such group {config.group!r} any more") from None
    groups = {gid, *os.getgrouplist(entry.pw_name, gid)} if config.group is None else {gid}
    return Identity(entry.pw_name, entry.pw_uid, gid, frozenset(groups))


# -- directories ------------------------------------------------------------------------


def _may(st: os.stat_result, identity: Identity, bits: int) -> bool:
    """Whether the permission ``bits`` (rwx as 4/2/1) are granted to ``identity``."""
    if st.st_uid == identity.uid:
        granted = (st.st_mode >> 6) & 7
    elif st.st_gid in identity.groups:
        granted = (st.st_mode >> 3) & 7
    else:
        granted = st.st_mode & 7
    return granted & bits == bits


def _describe(path: Path, st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"{path} (owner {owner}, mode {stat.filemode(st.st_mode)})"


def _problem(path: Path, identity: Identity, bits: int) -> str | None:
    """Why ``identity`` cannot use ``path`` with ``bits`` (ancestors must be searchable)."""
    for parent in reversed(path.parents):
        st = os.stat(parent)
        if not _may(st, identity, 1):
            return f"user {identity.user} cannot enter {_describe(parent, st)}"
    st = os.stat(path)
    if not _may(st, identity, bits):
        what = "write to" if bits & 2 else "read"
        return f"user {identity.user} cannot {what} {_describe(path, st)}"
    return None


def _make_owned(path: Path, identity: Identity, key: str) -> None:
    """Create ``path`` (and missing parents) owned by ``identity``, or check the existing one."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for created in missing:
            os.chown(created, *identity.owner)
        problem = _problem(path, identity, 7)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot create {path}: {exc.strerror or exc}") from None
    if problem is not None:
        raise ConfigError(f"{key}: {problem}; chown -R {identity.user} {path}")


def prepare_directories(config: Config, identity: Identity) -> None:
    """As root, before anything is written: the folders the server writes, owned by it.

    Existing ones (and the queue files in ``state_dir`` an earlier root run
    may have left) must be writable by the user: a one-line error naming the
    key otherwise, rather than a queue that fails on the first message.
    """
    _make_owned(config.state_dir, identity, "state_dir")
    for name in sorted(os.listdir(config.state_dir)):
        entry = config.state_dir / name
        if name.startswith("queue") and entry.is_file():
            problem = _problem(entry, identity, 6)
            if problem is not None:
                raise ConfigError(
                    f"state_dir: {problem}; chown -R {identity.user} {config.state_dir}"
                )
    _make_owned(config.local.maildir_root, identity, "[local].maildir_root")
    root = config.local.maildir_root
    for name in sorted(os.listdir(root)):
        entry = root / name
        if entry.is_dir():
            problem = _problem(entry, identity, 7)
            if problem is not None:
                raise ConfigError(
                    f"[local].maildir_root: {problem}; chown -R {identity.user} {root}"
                )


def hand_over_generated_certificate(config: Config, identity: Identity) -> None:
    """The self-signed pair in ``state_dir/tls`` belongs to the user, so a reload can
    read it (an operator's own key files are never changed)."""
    if config.tls.cert is not None:
        return
    tls_dir = config.state_dir / "tls"
    for path in (tls_dir, *config.generated_cert_paths):
        if path.exists():
            os.chown(path, *identity.owner)


# -- the switch -------------------------------------------------------------------------

_dropped_to: Identity | None = None


def dropped_to() -> Identity | None:
    """The identity this process switched to, None if it never dropped root."""
    return _dropped_to


def note_dropped_by_parent() -> None:
    """A worker whose parent dropped root before starting it runs as that user already."""
    global _dropped_to
    entry = pwd.getpwuid(os.getuid())
    _dropped_to = Identity(entry.pw_name, entry.pw_uid, os.getgid(), frozenset(os.getgroups()))


class PrivilegeDropError(Exception):
    """Switching users failed or was not complete; the server must not serve."""


def drop(identity: Identity) -> None:
    """Become ``identity`` for good: groups, then group, then user; verified."""
    global _dropped_to
    try:
        if len(identity.groups) > 1:
            os.initgroups(identity.user, identity.gid)
        else:
            os.setgroups([identity.gid])
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
    except OSError as exc:
        raise PrivilegeDropError(
            f"user: cannot switch to {identity.user}: {exc.strerror or exc}"
        ) from None
    if os.getresuid() != (identity.uid,) * 3 or os.getresgid() != (identity.gid,) * 3:
        raise PrivilegeDropError(
            f"user: switching to {identity.user} left uids {os.getresuid()} gids {os.getresgid()}"
        )
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeDropError(f"user: after switching to {identity.user} root came back")
    if 0 in os.getgroups() and 0 not in identity.groups:
        raise PrivilegeDropError(f"user: {identity.user} still has group root")
    _dropped_to = identity
    log.event(
        "privileges.dropped",
        user=identity.user,
        uid=identity.uid,
        gid=identity.gid,
        pid=os.getpid(),
    )
