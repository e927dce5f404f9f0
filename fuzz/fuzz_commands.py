#!/usr/bin/env python3
"""atheris harness for ``parse_command``: any line, either SMTPUTF8 setting.

Beyond "no exception but CommandError", it checks that every refusal carries a
5xx reply, and that whatever parses is re-emitted by ``format_command`` as a
line that parses back to the same command. The first input byte picks the
SMTPUTF8 setting; the rest is the line (without CRLF).

    python fuzz/fuzz_commands.py fuzz/corpus-commands fuzz/seeds/commands
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from trio_mta.smtp import CommandError, format_command, parse_command


def test_one_input(data: bytes) -> None:
    if not data:
        return
    utf8_ok = bool(data[0] & 1)
    line = data[1:]
    try:
        command = parse_command(line, smtputf8_ok=utf8_ok)
    except CommandError as exc:
        if not 500 <= exc.reply.code < 600:
            raise AssertionError(f"{line!r}: non-5xx refusal {exc.reply}") from None
        return
    again = parse_command(format_command(command)[:-2], smtputf8_ok=True)
    if again != command:
        raise AssertionError(f"{line!r}: {command!r} formats back as {again!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
