"""DKIM verification (RFC 6376 §6) of every signature on a message, with dkimpy.

dkimpy looks keys up through a ``dnsfunc`` callback and would do blocking DNS of
its own; here the lookups are split off: :func:`key_names` says which TXT records
the signatures need, the trio resolver fetches them (see :mod:`.inbound`), and
:func:`verify` hands dkimpy a ``dnsfunc`` that answers from those records only.
Verification itself is CPU work with no I/O.

Results use RFC 8601 §2.7.1's words: ``pass``, ``fail`` (the signature or body hash
does not match), ``neutral`` (a signature we cannot evaluate: unknown algorithm),
``temperror`` (the key lookup failed), ``permerror`` (malformed signature, no key).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import dkim
from dkim import canonicalization
from dkim.util import InvalidTagValueList, parse_tag_value

from trio_mta.auth.signing import Relaxed, rfc822_parse

__all__ = [
    "DkimResult",
    "KeyAnswer",
    "Parsed",
    "SignatureInfo",
    "key_names",
    "parse",
    "signatures",
    "verify",
]

MIN_KEY_BITS = 1024  # RFC 8301 §3.2

# dkimpy looks c= up in this table on every verification. Its relaxed algorithm runs
# some 25 re.sub calls on a 1 KiB message, half of what checking a signature costs;
# the signer's canonicaliser gives the same bytes (tests/test_dkim.py checks it on
# arbitrary input against dkimpy's class, which stays as it is) and skips the
# substitutions that have nothing to replace.
canonicalization.ALGORITHMS[b"relaxed"] = Relaxed


@dataclass(frozen=True)
class SignatureInfo:
    """What a DKIM-Signature field claims, before any check."""

    domain: str  # d=, lower-cased
    selector: str  # s=
    algorithm: str  # a=
    b_prefix: str  # first 8 characters of b=, RFC 6008 header.b
    signed: frozenset[bytes] = frozenset()  # h= names, lower-cased

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True)
class KeyAnswer:
    """What DNS said about one key name: TXT strings (joined per record) or a failure."""

    records: tuple[bytes, ...] = ()
    temporary_error: str | None = None


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass | fail | neutral | temperror | permerror
    domain: str
    selector: str
    algorithm: str
    b_prefix: str
    reason: str = ""


_SIGNATURE = re.compile(rb"dkim-signature", re.IGNORECASE)


Parsed = tuple[list[list[bytes]], bytes]  # rfc822_parse (dkimpy's shape): headers, body


def parse(message: bytes) -> Parsed | None:
    """The message split once for every check (as dkimpy's parser does); None if it cannot be."""
    try:
        headers, body = rfc822_parse(message)
    except (dkim.MessageFormatError, IndexError):  # IndexError: a continuation line first
        return None
    return headers, body


def signatures(message: bytes | Parsed | None) -> list[SignatureInfo | None]:
    """One entry per DKIM-Signature field, top first; None for one that does not parse."""
    if isinstance(message, bytes):
        message = parse(_head(message))
    if message is None:
        return []
    headers = message[0]
    out: list[SignatureInfo | None] = []
    for name, value in headers:
        if not _SIGNATURE.fullmatch(name):
            continue
        try:
            tags = parse_tag_value(value)
            b = re.sub(rb"\s+", b"", tags.get(b"b", b""))
            out.append(
                SignatureInfo(
                    domain=tags[b"d"].decode("ascii").strip().lower(),
                    selector=tags[b"s"].decode("ascii").strip(),
                    algorithm=tags.get(b"a", b"").decode("ascii").strip().lower(),
                    b_prefix=b[:8].decode("ascii"),
                    signed=frozenset(n.strip().lower() for n in tags.get(b"h", b"").split(b":")),
                )
            )
        except (InvalidTagValueList, KeyError, UnicodeDecodeError):
            out.append(None)
    return out


def key_names(found: list[SignatureInfo | None]) -> list[str]:
    """The TXT names to fetch, each once."""
    return list(dict.fromkeys(sig.key_name for sig in found if sig is not None))


def verify(
    message: bytes | Parsed, found: list[SignatureInfo | None], keys: Mapping[str, KeyAnswer]
) -> list[DkimResult]:
    """Check every signature in *found* (from :func:`signatures` on the same *message*)."""
    if not found:
        return []
    parsed = parse(message) if isinstance(message, bytes) else message
    if parsed is None:
        return [DkimResult("permerror", "", "", "", "", "unparsable message") for _ in found]
    results: list[DkimResult] = []
    checker: dkim.DKIM | None = None
    for index, sig in enumerate(found):
        if sig is None:
            results.append(DkimResult("permerror", "", "", "", "", "malformed signature"))
            continue

        def done(result: str, reason: str = "", sig: SignatureInfo = sig) -> None:
            results.append(
                DkimResult(result, sig.domain, sig.selector, sig.algorithm, sig.b_prefix, reason)
            )

        if sig.algorithm not in ("rsa-sha256", "ed25519-sha256", "rsa-sha1"):
            done("neutral", f"unknown algorithm {sig.algorithm!r}")
            continue
        answer = keys.get(sig.key_name, KeyAnswer(temporary_error="key not looked up"))
        if answer.temporary_error is not None:
            done("temperror", answer.temporary_error)
            continue
        record = _key_record(answer.records)
        if record is None:
            done("permerror", f"no key at {sig.key_name}")
            continue
        problem = _key_problem(record)
        if problem is not None:
            done("permerror", f"unusable key at {sig.key_name}: {problem}")
            continue
        hashes = _key_hashes(record)
        if hashes is not None and sig.algorithm.rpartition("-")[2].encode() not in hashes:
            # RFC 6376 §6.1.2: the key's h= does not list a='s hash (dkimpy ignores h=).
            done("permerror", f"key at {sig.key_name} does not allow {sig.algorithm}")
            continue
        if checker is None:
            checker = dkim.DKIM(None, minkey=MIN_KEY_BITS, logger=_QUIET)
            # Only fields some h= names (and the signatures) can affect a hash; dkimpy
            # canonicalises every field it is given, so the others are left out. Order
            # among the kept fields is unchanged, so header selection (bottom-up per
            # name, RFC 6376 §5.4.2) picks exactly the same instances.
            names = {b"dkim-signature"}.union(*(f.signed for f in found if f is not None))
            checker.headers = [h for h in parsed[0] if h[0].lower() in names]
            checker.body = parsed[1]
        try:
            ok = checker.verify(index, dnsfunc=lambda _name, timeout=0, r=record: r)
        except dkim.ValidationError as exc:
            text = str(exc)
            done("fail" if "body hash" in text else "permerror", text)
            continue
        except (
            dkim.MessageFormatError,
            dkim.KeyFormatError,
            dkim.ParameterError,
            dkim.UnknownKeyTypeError,
            dkim.NaClNotFoundError,
        ) as exc:
            done("permerror", str(exc))
            continue
        except Exception as exc:  # dkimpy on hostile input: never crash the session
            done("permerror", f"{type(exc).__name__}: {exc}")
            continue
        if ok:
            done("pass")
        else:
            done("fail", "signature did not verify")
    return results


@lru_cache(maxsize=1024)
def _key_problem(record: bytes) -> str | None:
    """Why a key record cannot verify anything, or None (dkimpy parses it again later;
    remembering the verdict per record keeps that to once per key, not per message)."""
    try:
        dkim.evaluate_pk(b"key", record)
    except Exception as exc:  # KeyFormatError, binascii.Error, nacl's ValueError
        return str(exc) or type(exc).__name__
    return None


@lru_cache(maxsize=1024)
def _key_hashes(record: bytes) -> frozenset[bytes] | None:
    """The hash algorithms a key record's ``h=`` allows (RFC 6376 §3.6.1), None for all."""
    try:
        value = parse_tag_value(record).get(b"h")
    except InvalidTagValueList:
        return None  # not reached: _key_problem refuses such a record first
    if value is None:
        return None
    return frozenset(name.strip() for name in value.split(b":"))


def _key_record(records: tuple[bytes, ...]) -> bytes | None:
    """The key record among the TXT records of a name (the one with ``p=``)."""
    for record in records:
        if b"p=" in record:
            return record
    return None


def _head(message: bytes) -> bytes:
    """The header block only: enough for :func:`signatures`, and cheap on big messages."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 4]


class _Quiet:
    """dkimpy logs every failure at ERROR; our result carries the reason instead."""

    def debug(self, *args: object) -> None: ...
    def info(self, *args: object) -> None: ...
    def warning(self, *args: object) -> None: ...
    def error(self, *args: object) -> None: ...
    def isEnabledFor(self, level: int) -> bool:
        return False


_QUIET = _Quiet()
