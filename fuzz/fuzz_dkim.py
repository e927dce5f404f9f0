#!/usr/bin/env python3
"""atheris harness for DKIM (RFC 6376, RFC 8463) at our boundary with dkimpy.

``trio_mta.auth.dkim_verify`` (``parse``, ``signatures``, ``verify``, ``_key_record``,
``_key_problem``) and the signer of ``trio_mta.auth.signing``, with every key answer
supplied in-process (no DNS). The first input byte picks what the rest is:

0. a hostile message; after a NUL byte, optional key TXT records (one per line)
   answered for every key name its signatures need (without them, the harness key
   is published at its name and nothing elsewhere);
1. the key TXT records (one per line) published for a message the harness signed
   with its fixed Ed25519 key;
2. a hostile message, after a ``From:`` at the harness key's domain, signed
   in-harness, then checked as in 0 with the harness key published.

Oracle: never an exception out of our functions; ``parse`` gives the parsed message
or None; ``signatures`` gives one ``SignatureInfo`` or None per DKIM-Signature field,
the same from the header block alone as from the whole message; ``verify`` gives one
``DkimResult`` per entry, matching it, with a result among pass, fail, neutral,
temperror, permerror (the module docstring's set), permerror for an unparsable
field; and a signature passes exactly when dkimpy itself, verifying the whole
message afresh with the same key record, says it verifies and the record's ``h=``
(which dkimpy ignores) lists the signature's hash: our header filtering and reused
verifier change nothing (temperror aside: dkimpy is given no key then). A
``_key_record`` is the first record with ``p=``; ``_key_problem`` is a string or
None. Our signature always verifies as pass against the harness key; against any
hostile key record it passes only if that record carries the same Ed25519 key with
tags that allow it (``k=ed25519``; ``v=DKIM1``, ``h=`` listing sha256 and ``s=``
``*``/``email`` when present; ``p=`` decoded as leniently as dkimpy does). ``Signer.sign``
gives a signature or b"", never an exception.

    python fuzz/fuzz_dkim.py fuzz/corpus-dkim fuzz/seeds/dkim
"""

from __future__ import annotations

import base64
import email.utils  # noqa: F401  (imported before dkimpy, so not instrumented)
import hashlib
import sys
from pathlib import Path

import atheris
import authres  # noqa: F401  (what dkimpy imports that is not ours to fuzz: not
import dns.resolver  # noqa: F401  instrumented, which would only slow it down)
import nacl.signing
from cryptography.hazmat.primitives import serialization  # noqa: F401
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa  # noqa: F401

with atheris.instrument_imports():
    import dkim
    from dkim.util import InvalidTagValueList, parse_tag_value

    from trio_mta.auth import dkim_verify as dv
    from trio_mta.auth.keys import DkimKey, public_value
    from trio_mta.auth.signing import Signer

RESULTS = {"pass", "fail", "neutral", "temperror", "permerror"}
DOMAIN = "example.org"
SEED = hashlib.sha256(b"trio_mta fuzz_dkim").digest()
KEY = DkimKey(
    DOMAIN,
    "fuzz",
    Path("fuzz_dkim.key"),
    "ed25519",
    ed25519.Ed25519PrivateKey.from_private_bytes(SEED),
)
PUBLIC = public_value(KEY).encode("ascii")
RECORD = b"v=DKIM1; k=ed25519; p=" + PUBLIC
KEY_NAME = f"{KEY.selector}._domainkey.{DOMAIN}"
SIGNER = Signer([KEY])
NOW = 1_767_225_600  # 2026-01-01: any fixed time in the past (dkimpy refuses a future t=)
MESSAGE = (
    b"From: Alice Example <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: a subject\r\n that is folded  \r\n"
    b"Date: Wed, 02 Dec 2026 03:00:00 +0000\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"Hello  Bob, \r\n"
    b"\r\n\r\n"
)
SIGNED = SIGNER.sign(MESSAGE, now=NOW) + MESSAGE
FROM = b"From: <fuzz@example.org>\r\n"


QUIET = dv._QUIET  # the verifier's own silent logger for dkimpy


def _dkimpy_says(message: bytes, index: int, record: bytes | None, algorithm: str) -> bool:
    """dkimpy alone, on the whole message and a fresh verifier: does signature *index*
    verify? Plus the one check of RFC 6376 §6.1.2 dkimpy leaves out: a key whose ``h=``
    does not list the signature's hash is not used."""
    try:
        checker = dkim.DKIM(message, minkey=dv.MIN_KEY_BITS, logger=QUIET)
        if not checker.verify(index, dnsfunc=lambda _name, timeout=0: record):
            return False
    except Exception:
        return False
    assert record is not None
    allowed = parse_tag_value(record).get(b"h")
    if allowed is None:
        return True
    return algorithm.split("-")[-1].encode() in {a.strip() for a in allowed.split(b":")}


def check_message(message: bytes, keys: dict[str, dv.KeyAnswer] | None) -> list[dv.DkimResult]:
    parsed = dv.parse(message)
    found = dv.signatures(message)
    whole = dv.signatures(parsed)
    if found != whole:
        raise AssertionError(f"{message!r}: signatures {found} from the head, {whole} in all")
    for sig in found:
        if sig is None:
            continue
        if sig.domain != sig.domain.strip().lower() or len(sig.b_prefix) > 8:
            raise AssertionError(f"{message!r}: {sig}")
    names = dv.key_names(found)
    if len(names) != len(set(names)):
        raise AssertionError(f"{message!r}: key names {names}")
    if keys is None:
        keys = {name: dv.KeyAnswer((RECORD,) if name == KEY_NAME else ()) for name in names}
    results = dv.verify(message, found, keys)
    if parsed is not None and dv.verify(parsed, found, keys) != results:
        raise AssertionError(f"{message!r}: verify differs on bytes and on the parsed message")
    if len(results) != len(found):
        raise AssertionError(f"{message!r}: {len(results)} results for {len(found)} signatures")
    for index, (sig, result) in enumerate(zip(found, results, strict=True)):
        if result.result not in RESULTS:
            raise AssertionError(f"{message!r}: {result}")
        if sig is None:
            if result.result != "permerror":
                raise AssertionError(f"{message!r}: {result} for an unparsable field")
            continue
        claimed = (sig.domain, sig.selector, sig.algorithm, sig.b_prefix)
        if claimed != (result.domain, result.selector, result.algorithm, result.b_prefix):
            raise AssertionError(f"{message!r}: {result} for {sig}")
        if result.result == "temperror" or parsed is None:
            continue
        answer = keys.get(sig.key_name, dv.KeyAnswer())
        record = dv._key_record(answer.records)
        reference = _dkimpy_says(message, index, record, sig.algorithm)
        if reference != (result.result == "pass"):
            raise AssertionError(
                f"{message!r}: signature {index} {result}, dkimpy says {reference}"
            )
    return results


def _allows_our_key(record: bytes) -> bool:
    """Whether *record* publishes the harness key for an ed25519-sha256 email signature."""
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList:
        return False
    try:  # as leniently as dkimpy (and pynacl) decode it: other bytes are skipped
        if base64.b64decode(tags.get(b"p", b"")) != base64.b64decode(PUBLIC):
            return False
    except ValueError:
        return False
    if tags.get(b"k") != b"ed25519" or tags.get(b"v", b"DKIM1") != b"DKIM1":
        return False
    if b"sha256" not in [h.strip() for h in tags.get(b"h", b"sha256").split(b":")]:
        return False
    return tags.get(b"s", b"*") in (b"*", b"email")


def check_key_records(records: tuple[bytes, ...]) -> None:
    record = dv._key_record(records)
    with_p = [r for r in records if b"p=" in r]
    if record != (with_p[0] if with_p else None):
        raise AssertionError(f"{records!r}: key record {record!r}")
    for each in records:
        problem = dv._key_problem(each)
        if problem is not None and not isinstance(problem, str):
            raise AssertionError(f"{each!r}: problem {problem!r}")
    [result] = check_message(SIGNED, {KEY_NAME: dv.KeyAnswer(records)})
    if result.result == "pass" and (record is None or not _allows_our_key(record)):
        raise AssertionError(f"{records!r}: our signature passes with {record!r}")


def check_signed(payload: bytes) -> None:
    SIGNER.sign(payload, now=NOW)  # b"" or a signature, never an exception
    message = FROM + payload
    signature = SIGNER.sign(message, now=NOW)
    if not signature:
        return  # not parsable, or a From: that hides ours (several, one malformed)
    results = check_message(signature + message, None)
    if not results or results[0].result != "pass":
        raise AssertionError(f"{message!r}: our own signature gives {results}")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, payload = data[0] % 3, data[1:]
    if mode == 0:
        message, nul, extra = payload.partition(b"\x00")
        keys = None
        if nul:
            records = tuple(extra.split(b"\n"))
            found = dv.signatures(message)
            keys = {
                name: dv.KeyAnswer(temporary_error="SERVFAIL")
                if name.startswith("temp")
                else dv.KeyAnswer(records)
                for name in dv.key_names(found)
            }
        check_message(message, keys)
    elif mode == 1:
        check_key_records(tuple(payload.split(b"\n")))
    else:
        check_signed(payload)


def _self_test() -> None:
    [ours] = check_message(SIGNED, None)
    assert ours.result == "pass", ours
    by_dkimpy = dkim.sign(
        MESSAGE,
        b"fuzz",
        DOMAIN.encode(),
        base64.b64encode(SEED),
        signature_algorithm=b"ed25519-sha256",
        logger=QUIET,
    )
    assert [r.result for r in check_message(by_dkimpy + MESSAGE, None)] == ["pass"]
    assert nacl.signing.SigningKey(SEED).verify_key.encode() == base64.b64decode(PUBLIC)


def main() -> None:
    _self_test()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
