"""trio_mta.server.passwords: the scrypt password file behind SMTP AUTH and `trio-mta passwd`."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import pty
import re
import select
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from trio_mta.cli.passwd import PasswordInputError, read_new_password
from trio_mta.server.passwords import (
    PasswordFile,
    check_password,
    hash_password,
    validate_username,
)


@pytest.fixture
def users(tmp_path: Path) -> PasswordFile:
    return PasswordFile(tmp_path / "passwd")


def entries(path: Path) -> dict[str, str]:
    result = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            user, _, encoded = line.partition(":")
            result[user] = encoded
    return result


# --------------------------------------------------------------------- hashing


def test_encoded_format_is_parseable_and_correct() -> None:
    salt = bytes(range(16))
    encoded = hash_password("hunter2", salt=salt)
    scheme, n, r, p, b64salt, b64hash = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert base64.b64decode(b64salt, validate=True) == salt
    expected = hashlib.scrypt(b"hunter2", salt=salt, n=16384, r=8, p=1, dklen=32)
    assert base64.b64decode(b64hash, validate=True) == expected


def test_check_password() -> None:
    encoded = hash_password("correct horse")
    assert check_password("correct horse", encoded)
    assert not check_password("correct horsE", encoded)
    assert not check_password("", encoded)
    assert not check_password("\udcff", encoded)  # unencodable: a mismatch, not a crash


def test_unicode_normalisation() -> None:
    """Composed and decomposed spellings of the same password match (RFC 4013 §2.2)."""
    encoded = hash_password("caf\u00e9")
    assert check_password("cafe\u0301", encoded)


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "md5$abc",
        "scrypt$16384$8$1$AAAA",
        "scrypt$16383$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # N not a power of two
        "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # N too large
        "scrypt$16384$999$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,
        "scrypt$16384$8$1$not*base64$" + "A" * 44,
    ],
)
def test_malformed_encoded_is_an_error(encoded: str) -> None:
    with pytest.raises(ValueError):
        check_password("x", encoded)


# ------------------------------------------------------------------- usernames


@pytest.mark.parametrize("name", ["", "a:b", "a b", "a\tb", "a\nb", "a\x00b", "a\x7fb", "a\u200bb"])
def test_bad_usernames_refused(users: PasswordFile, name: str) -> None:
    with pytest.raises(ValueError):
        validate_username(name)
    with pytest.raises(ValueError):
        users.set_password(name, "pw")
    assert not users.path.exists()


def test_good_usernames_accepted() -> None:
    for name in ("alice", "alice@example.org", "ünïcode", "a.b-c_d+e"):
        validate_username(name)


# ------------------------------------------------------------------ the file


def test_set_and_verify_round_trip(users: PasswordFile) -> None:
    users.set_password("alice", "s3cret")
    assert users.verify("alice", "s3cret")
    assert not users.verify("alice", "S3cret")
    assert not users.verify("bob", "s3cret")
    assert not users.verify("a:b", "s3cret")  # invalid names from the wire are just unknown
    assert PasswordFile(users.path).verify("alice", "s3cret")  # persisted
    assert users.usernames() == ["alice"]


def test_missing_file_means_no_users(users: PasswordFile) -> None:
    assert not users.verify("alice", "x")
    assert users.usernames() == []


def test_file_mode_and_atomic_rewrite(users: PasswordFile) -> None:
    users.path.write_text("# managed by trio-mta passwd\nbob:" + hash_password("b") + "\n")
    os.chmod(users.path, 0o644)
    inode_before = users.path.stat().st_ino
    users.set_password("alice", "a")
    st = users.path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_ino != inode_before  # replaced by rename, not rewritten in place
    assert [p.name for p in users.path.parent.iterdir()] == ["passwd"]  # no temp left
    text = users.path.read_text()
    assert text.startswith("# managed by trio-mta passwd\nbob:")
    assert text.endswith("\n")
    assert users.verify("bob", "b") and users.verify("alice", "a")


def test_set_password_replaces_in_place(users: PasswordFile) -> None:
    users.set_password("alice", "one")
    users.set_password("bob", "two")
    users.set_password("alice", "three")
    assert list(entries(users.path)) == ["alice", "bob"]
    assert users.verify("alice", "three")
    assert not users.verify("alice", "one")


def test_same_password_gets_different_salts(users: PasswordFile) -> None:
    users.set_password("alice", "same")
    users.set_password("bob", "same")
    stored = entries(users.path)
    assert stored["alice"] != stored["bob"]
    assert stored["alice"].split("$")[4] != stored["bob"].split("$")[4]


def test_changes_picked_up_without_new_object(users: PasswordFile) -> None:
    """`trio-mta passwd` in another process; the running server's object sees it."""
    users.set_password("alice", "old")
    assert users.verify("alice", "old")
    other = PasswordFile(users.path)
    other.set_password("alice", "new")
    other.set_password("carol", "c")
    assert users.verify("alice", "new")
    assert not users.verify("alice", "old")
    assert users.verify("carol", "c")


def test_in_place_edit_with_same_size_is_noticed(users: PasswordFile) -> None:
    """An editor that rewrites in place keeps the inode and size; the mtime tells."""
    first, second = hash_password("aaaa"), hash_password("bbbb")
    assert len(first) == len(second)
    users.path.write_text(f"alice:{first}\n")
    assert users.verify("alice", "aaaa")
    st = users.path.stat()
    with open(users.path, "r+") as handle:
        handle.write(f"alice:{second}\n")
    os.utime(users.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert users.path.stat().st_ino == st.st_ino
    assert users.verify("alice", "bbbb")
    assert not users.verify("alice", "aaaa")


def test_removed_file_drops_users(users: PasswordFile) -> None:
    users.set_password("alice", "a")
    assert users.verify("alice", "a")
    users.path.unlink()
    assert not users.verify("alice", "a")


def test_bad_lines_are_skipped_not_fatal(
    users: PasswordFile, caplog: pytest.LogCaptureFixture
) -> None:
    good = hash_password("pw")
    users.path.write_text(
        "\n".join(
            [
                "# comment",
                "",
                "no-colon-here",
                "broken:scrypt$xyz",
                f"bad user:{good}",
                f"alice:{good}",
                f"alice:{hash_password('other')}",  # duplicate: first wins
                f"  bob:{good}  ",
            ]
        )
        + "\n"
    )
    assert users.usernames() == ["alice", "bob"]
    assert users.verify("alice", "pw") and not users.verify("alice", "other")
    assert users.verify("bob", "pw")
    assert not users.verify("broken", "pw")
    warnings = [r.getMessage() for r in caplog.records]
    assert any(":3 ignored" in w for w in warnings)
    assert any(":4 ignored" in w for w in warnings)
    assert any(":7 ignored: duplicate user alice" in w for w in warnings)


def test_set_password_refuses_empty_and_nul(users: PasswordFile) -> None:
    for password in ("", "a\0b"):
        with pytest.raises(ValueError):
            users.set_password("alice", password)
    assert not users.path.exists()


def test_verify_is_thread_safe(users: PasswordFile) -> None:
    users.set_password("alice", "a")
    results: list[bool] = []

    def worker() -> None:
        results.append(users.verify("alice", "a"))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    users.set_password("bob", "b")  # a rewrite while others read
    for thread in threads:
        thread.join()
    assert results == [True] * 4


async def test_verify_async_runs_off_the_event_loop(users: PasswordFile) -> None:
    users.set_password("alice", "a")
    limiter = trio.CapacityLimiter(1)
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = users.verify

    def recording_verify(username: str, password: str) -> bool:
        seen.append(threading.get_ident())
        return original(username, password)

    users.verify = recording_verify  # type: ignore[method-assign]
    assert await users.verify_async("alice", "a", limiter=limiter)
    assert not await users.verify_async("alice", "b", limiter=limiter)
    assert not await users.verify_async("nobody", "a")
    assert seen and loop_thread not in seen


# ----------------------------------------------------------------- terminal input


def test_read_new_password_from_pipe() -> None:
    assert read_new_password(io.StringIO("s3cret\n"), prompt="Password: ") == "s3cret"
    assert read_new_password(io.StringIO("s3cret\r\n"), prompt="Password: ") == "s3cret"
    assert read_new_password(io.StringIO("s3cret"), prompt="Password: ") == "s3cret"
    assert read_new_password(io.StringIO(" spaced \n"), prompt="Password: ") == " spaced "


@pytest.mark.parametrize("data", ["", "\n", "two\nlines\n", "a\0b\n"])
def test_read_new_password_rejects(data: str) -> None:
    with pytest.raises(PasswordInputError):
        read_new_password(io.StringIO(data), prompt="Password: ")


TTY_CHILD = """
import sys
from trio_mta.cli.passwd import PasswordInputError, read_new_password
try:
    print("GOT[" + read_new_password(sys.stdin, prompt="Password: ") + "]")
except PasswordInputError as exc:
    print("ERR[" + str(exc) + "]")
"""


def run_on_tty(*answers: str) -> str:
    """Run read_new_password in a child whose stdin is a real pseudo-terminal,
    answering each prompt only once it appears (getpass flushes typed-ahead input)."""
    master, slave = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-c", TTY_CHILD],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    output = b""
    sent = 0
    deadline = time.monotonic() + 15
    try:
        while not re.search(rb"(GOT|ERR)\[.*\]", output):
            remaining = deadline - time.monotonic()
            assert remaining > 0, output
            if not select.select([master], [], [], remaining)[0]:
                continue
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            output += chunk
            if sent < len(answers) and output.count(b"assword: ") > sent:
                os.write(master, answers[sent].encode() + b"\n")
                sent += 1
    finally:
        child.wait(timeout=15)
        os.close(master)
    return output.decode()


def test_read_new_password_on_tty_asks_twice_without_echo() -> None:
    output = run_on_tty("tty-secret", "tty-secret")
    assert "Retype password: " in output
    assert "GOT[tty-secret]" in output
    assert output.count("tty-secret") == 1  # never echoed, only our result line


def test_read_new_password_on_tty_mismatch() -> None:
    output = run_on_tty("one", "two")
    assert "ERR[the passwords do not match]" in output
