"""trio_mta.safeio with real files: modes, owners, no leftovers, failures that leave nothing."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_mta.safeio import fsync_directory, replace_file, write_file_durably


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_replace_file_creates_then_replaces_with_nothing_left_over(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    replace_file(target, b"one\n")
    old_inode = target.stat().st_ino
    replace_file(target, b"two\n")
    assert target.read_bytes() == b"two\n"
    assert target.stat().st_ino != old_inode  # a rename, not a rewrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]


@pytest.mark.usefixtures("strict_umask")
def test_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    replace_file(tmp_path / "cert.pem", b"c", mode=0o644)
    replace_file(tmp_path / "key.pem", b"k", mode=0o600)
    assert (mode(tmp_path / "cert.pem"), mode(tmp_path / "key.pem")) == (0o644, 0o600)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file away")
def test_owner_is_applied(tmp_path: Path) -> None:
    replace_file(tmp_path / "f", b"x", owner=(12345, 23456))
    st = (tmp_path / "f").stat()
    assert (st.st_uid, st.st_gid) == (12345, 23456)


def test_existing_tmp_name_is_refused_untouched(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp-name"
    tmp.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        write_file_durably(tmp, tmp_path / "final", [b"mine"])
    assert tmp.read_bytes() == b"someone else's"
    assert not (tmp_path / "final").exists()


def test_planted_symlink_at_tmp_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "tmp-name").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_file_durably(tmp_path / "tmp-name", tmp_path / "final", [b"evil"])
    assert victim.read_bytes() == b"keep"


def test_failed_rename_removes_the_tmp_file(tmp_path: Path) -> None:
    final = tmp_path / "final"
    final.mkdir()
    (final / "occupied").write_bytes(b"")  # renaming a file over a directory fails
    with pytest.raises(IsADirectoryError):
        write_file_durably(tmp_path / "tmp-name", final, [b"a", b"b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_missing_target_folder_is_made_once_on_request(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    made: list[Path] = []

    def make() -> None:
        made.append(tmp_path / "new")
        (tmp_path / "new").mkdir()

    write_file_durably(
        tmp_path / "tmp" / "m",
        tmp_path / "new" / "m",
        [b"head\n", b"body\n"],
        fsync_dir=False,
        make_target_dir=make,
    )
    assert made == [tmp_path / "new"]
    assert (tmp_path / "new" / "m").read_bytes() == b"head\nbody\n"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_missing_target_folder_without_a_maker_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_file_durably(tmp_path / "m", tmp_path / "new" / "m", [b"x"])
    assert list(tmp_path.iterdir()) == []


def test_fsync_directory_needs_a_directory(tmp_path: Path) -> None:
    fsync_directory(tmp_path)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_directory(tmp_path / "file")
