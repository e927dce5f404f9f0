#!/usr/bin/env python3
"""atheris harness for the RFC 3461 parameters of MAIL and RCPT, and xtext.

Oracle: every input either parses or is refused with a 5xx ``CommandError``
(never another exception); a parsed NOTIFY is NEVER alone or a duplicate-free
subset of SUCCESS,FAILURE,DELAY; an ENVID is ASCII; and whatever parses is
re-emitted by ``format_command`` as a line that parses back to the same
command. Any decodable xtext re-encodes to xtext that decodes to the same text.
The first input byte picks MAIL or RCPT (bit 0) and whether the rest is fed to
``xtext_decode`` alone (bit 1); the rest is the parameter text.

    python fuzz/fuzz_dsn.py fuzz/corpus-dsn
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from trio_mta.smtp import CommandError, Mail, Rcpt, format_command, parse_command
    from trio_mta.smtp.commands import NOTIFY_ORDER, xtext_decode, xtext_encode


def _check_xtext(text: str) -> None:
    try:
        decoded = xtext_decode(text)
    except ValueError:
        return
    if xtext_decode(xtext_encode(decoded)) != decoded:
        raise AssertionError(f"{text!r}: xtext does not round-trip")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    rest = data[1:]
    if data[0] & 2:
        _check_xtext(rest.decode("utf-8", "replace"))
        return
    prefix = b"RCPT TO:<x@y.example> " if data[0] & 1 else b"MAIL FROM:<a@b.example> "
    line = prefix + rest
    try:
        command = parse_command(line)
    except CommandError as exc:
        if not 500 <= exc.reply.code < 600:
            raise AssertionError(f"{line!r}: non-5xx refusal {exc.reply}") from None
        return
    if isinstance(command, Rcpt) and command.params.notify is not None:
        notify = command.params.notify
        if notify != ("NEVER",) and notify != tuple(w for w in NOTIFY_ORDER if w in notify):
            raise AssertionError(f"{line!r}: NOTIFY {notify!r}")
    envid = command.params.envid if isinstance(command, Mail) else None
    if envid is not None and not envid.isascii():
        raise AssertionError(f"{line!r}: non-ASCII ENVID")
    again = parse_command(format_command(command)[:-2])
    if again != command:
        raise AssertionError(f"{line!r}: {command!r} formats back as {again!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
