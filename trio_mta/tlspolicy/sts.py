"""MTA-STS (RFC 8461) without I/O: the TXT record, the policy file, MX pattern matching.

Everything here takes text and returns frozen data or raises :class:`StsError`
with one line that says what is wrong, so a bad policy shows up in the log and
in ``trio-mta tls-policy`` as a reason, never as a traceback. Fetching and
caching live in :mod:`trio_mta.tlspolicy.fetch` and :mod:`trio_mta.tlspolicy.cache`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "MAX_AGE_LIMIT",
    "StsError",
    "StsMode",
    "StsPolicy",
    "StsRecord",
    "choose_txt",
    "mx_matches",
    "parse_policy",
    "parse_txt",
    "policy_url_host",
]

StsMode = Literal["enforce", "testing", "none"]
MAX_AGE_LIMIT: Final = 31_557_600  # RFC 8461 §3.2: max_age is at most one year
_ID: Final = re.compile(r"[A-Za-z0-9]{1,32}\Z")  # RFC 8461 §3.1 sts-id
_MAX_AGE: Final = re.compile(r"[0-9]{1,10}\Z")
_LABEL: Final = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_KEY: Final = re.compile(r"[A-Za-z0-9_.-]{1,32}\Z")  # RFC 8461 §3.2 field-name
# §3.1: "records that do not begin with v=STSv1; are discarded" (the ABNF allows WSP before ;).
_STS_START: Final = re.compile(r"v=STSv1[ \t]*;")
# Host names compare case-insensitively in ASCII only (RFC 4343): str.lower() would turn
# U+212A KELVIN SIGN into "k" and so let a name that is not k.example match k.example.
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class StsError(ValueError):
    """A TXT record or policy that must be treated as absent; str() is the reason."""


@dataclass(frozen=True)
class StsRecord:
    """``_mta-sts.DOMAIN`` TXT: only the id matters to a sender (it says when to refetch)."""

    id: str


@dataclass(frozen=True)
class StsPolicy:
    """A parsed ``mta-sts.txt``; ``mx`` holds the lower-case patterns in file order."""

    mode: StsMode
    max_age: int
    mx: tuple[str, ...]

    def allows(self, host: str) -> bool:
        """True when *host* (an MX name) matches one of the ``mx:`` patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def describe(self) -> str:
        return f"mode {self.mode}, max_age {self.max_age}s, mx: {', '.join(self.mx) or '-'}"


def policy_url_host(domain: str) -> str:
    """The policy host of *domain* (RFC 8461 §3.3): ``mta-sts.`` + the domain."""
    return "mta-sts." + domain.lower().rstrip(".")


def parse_txt(strings: Iterable[str]) -> StsRecord:
    """One TXT record (its character-strings, concatenated as RFC 8461 §3.1 says).

    ``v=STSv1`` must come first; ``id`` is required; other fields are extensions,
    ignored when well-formed.
    """
    text = "".join(strings)
    fields = [part.strip() for part in text.split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing ";" is allowed
    if not fields or fields[0] != "v=STSv1":
        raise StsError(f"TXT record does not start with v=STSv1: {text[:80]!r}")
    found: str | None = None
    for field_text in fields[1:]:
        key, eq, value = field_text.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not _KEY.match(key):
            raise StsError(f"TXT record field is not key=value: {field_text[:80]!r}")
        if key == "id":
            if found is not None:
                raise StsError("TXT record has two id fields")
            if not _ID.match(value):
                raise StsError(f"TXT record id must be 1-32 letters and digits, got {value[:40]!r}")
            found = value
    if found is None:
        raise StsError("TXT record has no id field")
    return StsRecord(found)


def choose_txt(records: Iterable[Iterable[str]]) -> StsRecord | None:
    """The record among a name's TXT records: None when none starts with ``v=STSv1;``.

    RFC 8461 §3.1: other records (``v=STSv10``, ``v=STSv1x``) are discarded; more than
    one STSv1 record means no policy (an error).
    """
    candidates = ["".join(strings) for strings in records]
    ours = [text for text in candidates if _STS_START.match(text)]
    if not ours:
        return None
    if len(ours) > 1:
        raise StsError(f"{len(ours)} v=STSv1 TXT records (RFC 8461 §3.1 allows one)")
    return parse_txt([ours[0]])


def parse_policy(text: str) -> StsPolicy:
    """The policy file (RFC 8461 §3.2): ``key: value`` lines ended by LF or CRLF.

    ``version`` must be ``STSv1``, ``mode`` one of enforce/testing/none,
    ``max_age`` 0..31557600 seconds, and ``mx`` (repeatable) is required unless the
    mode is none. Unknown keys are extensions and are ignored; a repeated
    single-valued key is an error, since which one counts would be a guess.
    """
    seen: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not colon or not _KEY.match(key):
            raise StsError(f"policy line {number} is not 'key: value': {line[:80]!r}")
        if key == "mx":
            mx.append(_pattern(value, number))
        elif key in ("version", "mode", "max_age"):
            if key in seen:
                raise StsError(f"policy line {number}: {key} given twice")
            seen[key] = value
    version = seen.get("version")
    if version != "STSv1":
        raise StsError(
            "policy has no 'version: STSv1'"
            if version is None
            else f"policy version must be STSv1, got {version[:40]!r}"
        )
    mode_text = seen.get("mode")
    modes: dict[str, StsMode] = {"enforce": "enforce", "testing": "testing", "none": "none"}
    mode = modes.get(mode_text or "")
    if mode is None:
        raise StsError(
            "policy has no mode"
            if mode_text is None
            else f"policy mode must be enforce, testing or none, got {mode_text[:40]!r}"
        )
    age_text = seen.get("max_age")
    if age_text is None:
        raise StsError("policy has no max_age")
    if not _MAX_AGE.match(age_text) or int(age_text) > MAX_AGE_LIMIT:
        raise StsError(f"policy max_age must be 0..{MAX_AGE_LIMIT} seconds, got {age_text[:40]!r}")
    if not mx and mode != "none":
        raise StsError(f"policy in mode {mode} has no mx line")
    return StsPolicy(mode, int(age_text), tuple(mx))


def _pattern(value: str, number: int) -> str:
    """``mx1.example.org`` or ``*.example.org`` (a wildcard only as the whole first label).

    One final dot is allowed and dropped; ASCII letters are lower-cased, nothing else.
    """
    pattern = value.translate(_ASCII_LOWER).removesuffix(".")
    labels = pattern.split(".")
    rest = labels[1:] if labels[0] == "*" else labels
    if len(labels) < 2 or not all(_LABEL.match(label) for label in rest):
        raise StsError(
            f"policy line {number}: mx must be a host name or *.domain, got {value[:80]!r}"
        )
    return pattern


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact match, or ``*.`` standing for exactly one leftmost label.

    *pattern* is one of :attr:`StsPolicy.mx`; *host* compares ASCII case-insensitively,
    with one final dot (the root) ignored.
    """
    name = host.translate(_ASCII_LOWER).removesuffix(".")
    if pattern.startswith("*."):
        label, dot, parent = name.partition(".")
        return bool(dot) and bool(label) and parent == pattern[2:]
    return name == pattern
