#!/usr/bin/env python3
"""atheris harness for the MTA-STS parsers (``trio_mta.tlspolicy.sts``, RFC 8461).

Oracle: only the documented ``StsError`` ever escapes (its text one non-empty line),
and on success what RFC 8461 promises holds:

* ``parse_policy``: mode is enforce, testing or none; max_age an int in
  0..MAX_AGE_LIMIT; every mx pattern is lower-case LDH labels (at least two), the
  first possibly ``*``, no empty label and no final dot; a mode other than none has an
  mx; the policy allows each of its own patterns (a wildcard with a label put in its
  place). The outcome, down to the error text, is the same when every line ends in
  CRLF, or in LF (§3.2: ``sts-policy-term = LF / CRLF``) unless a line's text ends in
  CR, which LF cannot express.
* ``parse_txt``: the id is 1-32 ASCII letters and digits, and the outcome does not
  depend on how the record is cut into character-strings (§3.1: they are concatenated).
* ``choose_txt``: agrees with a reference of §3.1: records that do not begin with
  ``v=STSv1`` then ``;`` (with the ABNF's optional WSP between) are discarded; none
  left is no policy, more than one is an error, one is parsed.
* ``mx_matches``: agrees with a reference of §4.1 written here, label by label: ASCII
  case-insensitive (RFC 4343), one final dot of the host ignored, ``*`` standing for
  exactly one non-empty leftmost label.

The first byte picks the target (bits 0-1: policy, TXT, TXT record set, mx pattern and
host) and, for a TXT record, where to cut it in two strings (bits 2-7); the rest is
UTF-8 text. A TXT record set is records separated by LF, each cut into strings at NUL;
an mx case is the pattern (given as an ``mx:`` value) and the host, separated by LF.

    python fuzz/fuzz_mtasts.py fuzz/corpus-mtasts fuzz/seeds/mtasts
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import TypeVar

import atheris

with atheris.instrument_imports():
    from trio_mta.tlspolicy.sts import (
        MAX_AGE_LIMIT,
        StsError,
        StsPolicy,
        StsRecord,
        choose_txt,
        mx_matches,
        parse_policy,
        parse_txt,
    )

_T = TypeVar("_T")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_STS_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_STS_START = re.compile(r"v=STSv1[ \t]*;")  # §3.1 "begin with v=STSv1;", ABNF delimiter


def _outcome(parse: Callable[[_T], object], arg: _T) -> object:
    """The result, or the error's text; anything but StsError propagates (a finding)."""
    try:
        return parse(arg)
    except StsError as exc:
        reason = str(exc)
        if not reason or "\n" in reason:
            raise AssertionError(f"StsError text {reason!r} is not one line") from None
        return StsError, reason


def _well_formed(pattern: str) -> bool:
    labels = pattern.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if not labels:
            return False
    return len(pattern.split(".")) >= 2 and all(_LDH_LABEL.match(label) for label in labels)


def _reference_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1, label by label."""
    name = host.translate(_ASCII_LOWER)
    if name.endswith("."):
        name = name[:-1]
    wanted, labels = pattern.split("."), name.split(".")
    if len(wanted) != len(labels):
        return False
    for index, (want, label) in enumerate(zip(wanted, labels, strict=True)):
        if index == 0 and want == "*":
            if not label:
                return False
        elif want != label:
            return False
    return True


def _check_policy(text: str) -> None:
    outcome = _outcome(parse_policy, text)
    *lines, last = text.split("\n")  # the last piece has no line end to swap
    lines = [line.removesuffix("\r") for line in lines]
    others = ["".join(line + "\r\n" for line in lines) + last]
    if not any(line.endswith("\r") for line in lines):  # else LF would make it CRLF
        others.append("".join(line + "\n" for line in lines) + last)
    for other in others:
        again = _outcome(parse_policy, other)
        if again != outcome:
            raise AssertionError(f"{text!r}: {outcome!r}, but {other!r} gives {again!r}")
    if not isinstance(outcome, StsPolicy):
        return
    policy = outcome
    if policy.mode not in ("enforce", "testing", "none"):
        raise AssertionError(f"{text!r}: mode {policy.mode!r}")
    if type(policy.max_age) is not int or not 0 <= policy.max_age <= MAX_AGE_LIMIT:
        raise AssertionError(f"{text!r}: max_age {policy.max_age!r}")
    if policy.mode != "none" and not policy.mx:
        raise AssertionError(f"{text!r}: mode {policy.mode} without mx")
    for pattern in policy.mx:
        if not _well_formed(pattern):
            raise AssertionError(f"{text!r}: mx pattern {pattern!r}")
        host = "mx" + pattern[1:] if pattern.startswith("*.") else pattern
        if not policy.allows(host) or not policy.allows(host.upper() + "."):
            raise AssertionError(f"{text!r}: {policy!r} does not allow {host!r}")


def _check_txt(text: str, cut: int) -> None:
    whole = _outcome(parse_txt, [text])
    cut = min(cut, len(text))
    split = _outcome(parse_txt, [text[:cut], text[cut:]])
    if split != whole:
        raise AssertionError(f"{text!r}: whole {whole!r}, cut at {cut} {split!r}")
    if isinstance(whole, StsRecord) and not (_STS_ID.match(whole.id) and whole.id.isascii()):
        raise AssertionError(f"{text!r}: id {whole.id!r}")
    _check_choice([(text[:cut], text[cut:])])


def _check_choice(records: list[tuple[str, ...]]) -> None:
    try:
        chosen: object = choose_txt(records)
    except StsError:
        chosen = StsError
    ours = [text for text in ("".join(strings) for strings in records) if _STS_START.match(text)]
    expected: object = None
    if len(ours) > 1:
        expected = StsError
    elif ours:
        expected = _outcome(parse_txt, [ours[0]])
        if isinstance(expected, tuple):
            expected = StsError
    if chosen != expected:
        raise AssertionError(f"{records!r}: choose_txt gives {chosen!r}, RFC 8461 {expected!r}")


def _check_mx(text: str) -> None:
    value, _, host = text.partition("\n")
    parsed = _outcome(parse_policy, f"version: STSv1\nmode: enforce\nmax_age: 0\nmx:{value}")
    if not isinstance(parsed, StsPolicy):
        return
    (pattern,) = parsed.mx
    hosts = [host, host.upper(), host + ".", host + "..", "." + host, "mx." + host, pattern]
    hosts += [pattern.upper() + ".", pattern + "..", pattern.replace("*", "mx.mx")]
    if pattern.startswith("*."):
        hosts += ["mx" + pattern[1:], pattern[2:], "." + pattern[2:], host + pattern[1:]]
    for name in hosts:
        got, expected = mx_matches(pattern, name), _reference_matches(pattern, name)
        if got is not expected:
            raise AssertionError(f"mx_matches({pattern!r}, {name!r}) is {got}, RFC 8461 {expected}")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    text = data[1:].decode("utf-8", "replace")
    target = data[0] & 3
    if target == 0:
        _check_policy(text)
    elif target == 1:
        _check_txt(text, data[0] >> 2)
    elif target == 2:
        _check_choice([tuple(record.split("\x00")) for record in text.split("\n")])
    else:
        _check_mx(text)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
