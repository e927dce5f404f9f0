"""``[local] lmtp`` and ``[local] maildir_group``: accepted forms and one-line errors."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest
import trio

from trio_mta.config import Config, ConfigError
from trio_mta.delivery.maildir import MaildirAgent

from .test_maildir import item


def local(tmp_path: Path, **keys: object) -> Config:
    return Config.from_mapping({"local": {"domains": ["example.test"], **keys}}, base_dir=tmp_path)


def error(tmp_path: Path, **keys: object) -> str:
    with pytest.raises(ConfigError) as info:
        local(tmp_path, **keys)
    (only,) = info.value.errors
    return only


def test_defaults_write_private_maildir(tmp_path: Path) -> None:
    config = local(tmp_path)
    assert config.local.lmtp is None and config.local.maildir_group is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:24", "127.0.0.1:24"),
        ("[::1]:24", "[::1]:24"),
        ("localhost:2424", "localhost:2424"),
        ("unix:/run/dovecot/lmtp", "unix:/run/dovecot/lmtp"),
    ],
)
def test_lmtp_targets(tmp_path: Path, value: str, expected: str) -> None:
    assert local(tmp_path, lmtp=value).local.lmtp == expected


@pytest.mark.parametrize("value", ["127.0.0.1", "unix:run/lmtp", "127.0.0.1:0", 24, ""])
def test_bad_lmtp_target_names_the_key(tmp_path: Path, value: object) -> None:
    assert error(tmp_path, lmtp=value).startswith("[local].lmtp: must be ")


def test_maildir_group_by_name_or_number(tmp_path: Path) -> None:
    gid = grp.getgrnam("mail").gr_gid
    assert local(tmp_path, maildir_group="mail").local.maildir_group == gid
    assert local(tmp_path, maildir_group=gid).local.maildir_group == gid
    assert local(tmp_path, maildir_group=str(gid)).local.maildir_group == gid


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("no-such-group-here", "no group named 'no-such-group-here' on this system"),
        (True, "must be a group name or a numeric group id"),
        (-1, "must be a group name or a numeric group id"),
    ],
)
def test_bad_maildir_group_names_the_key(tmp_path: Path, value: object, why: str) -> None:
    assert error(tmp_path, maildir_group=value).startswith(f"[local].maildir_group: {why}")


def _modes(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_gid, stat.S_IMODE(info.st_mode)


async def test_maildir_group_gives_group_folders_and_files_whatever_the_umask(
    tmp_path: Path,
) -> None:
    gid = grp.getgrnam("mail").gr_gid
    if os.getgid() == gid:
        pytest.skip("the test needs a group other than our own")
    root = tmp_path / "mail"
    agent = MaildirAgent(root, "mx.test", limiter=trio.CapacityLimiter(2), group=gid)
    old = os.umask(0o077)
    try:
        (outcome,) = await agent.deliver([item("bob")])
    finally:
        os.umask(old)
    assert outcome.kind == "delivered", outcome
    for folder in (root, root / "bob", *(root / "bob" / sub for sub in ("new", "cur", "tmp"))):
        assert _modes(folder) == (gid, 0o2770), folder
    (file,) = (root / "bob" / "new").iterdir()
    assert _modes(file) == (gid, 0o660)


async def test_without_maildir_group_the_maildir_stays_private(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    agent = MaildirAgent(root, "mx.test", limiter=trio.CapacityLimiter(2))
    (outcome,) = await agent.deliver([item("bob")])
    assert outcome.kind == "delivered"
    assert _modes(root / "bob" / "new")[1] == 0o700
    (file,) = (root / "bob" / "new").iterdir()
    assert _modes(file) == (os.getgid(), 0o600)
