"""``trio-mta passwd USER``: set a submission password in the scrypt password file.

A running server re-reads the file when it changes, so the password works at
once; reading it from the terminal (twice, no echo) or from stdin is done here.
"""

from __future__ import annotations

import getpass
import sys
from typing import TextIO

from trio_mta.cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from trio_mta.config import Config
from trio_mta.server.passwords import PasswordFile

__all__ = ["PasswordInputError", "read_new_password", "run_passwd"]


class PasswordInputError(ValueError):
    """A new password could not be read (mismatch, empty, forbidden character)."""


def run_passwd(config: Config, user: str) -> int:
    """Set USER's password from the terminal (twice) or stdin; 0, 1 (I/O) or 2 (bad input)."""
    try:
        password = read_new_password(sys.stdin, prompt=f"New password for {user}: ")
        PasswordFile(config.auth.users_file).set_password(user, password)
    except ValueError as exc:
        print(f"trio-mta passwd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"trio-mta passwd: {config.auth.users_file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"password set for {user} in {config.auth.users_file}")
    return EXIT_OK


def read_new_password(stdin: TextIO, *, prompt: str = "New password: ") -> str:
    """The password for ``trio-mta passwd``: typed twice without echo on a terminal,
    or the whole of stdin (one trailing newline removed) in scripts."""
    if stdin.isatty():
        first = getpass.getpass(prompt)
        second = getpass.getpass("Retype " + prompt[:1].lower() + prompt[1:])
        if first != second:
            raise PasswordInputError("the passwords do not match")
        password = first
    else:
        password = stdin.read()
        if password.endswith("\r\n"):
            password = password[:-2]
        elif password.endswith("\n"):
            password = password[:-1]
    if not password:
        raise PasswordInputError("the password is empty")
    if any(char in password for char in "\0\r\n"):
        raise PasswordInputError("the password contains a line break or NUL")
    return password
