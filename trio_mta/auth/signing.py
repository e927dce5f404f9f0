"""DKIM signing (RFC 6376 §5, Ed25519 per RFC 8463) of mail our own users send.

Parsing, canonicalisation and header selection give dkimpy's bytes exactly
(``rfc822_parse``, ``Relaxed``, ``hash_headers``): that is where DKIM interoperability
is won or lost, and dkimpy's output is what OpenDKIM and the large receivers have
verified for years. They are re-done here only because dkimpy's cost most of an
Ed25519 signature in Python overhead, and hypothesis tests in tests/test_dkim.py hold
each to dkimpy's on arbitrary input. The public-key operation on the digest is done with
``cryptography`` (OpenSSL) instead of dkimpy's pure-Python RSA, which costs ~30 ms
per RSA 2048 signature; and the signature field is folded here, since dkimpy's
``fold`` can cut a header name of a long ``h=`` in two.

One parse and one body hash serve every key: several ``[[dkim.sign]]`` entries for
a domain (an RSA and an Ed25519 key) give several signatures for the price of one
canonicalisation.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Sequence
from email.utils import getaddresses

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.canonicalization import correct_empty_body, strip_trailing_lines

from trio_mta.auth.keys import DkimKey

__all__ = ["SIGNED_HEADERS", "Signer", "from_domains", "rfc822_parse"]

# SPEC §9: the usual headers, signed when present; From once more (over-signed) so
# that nobody can add a second From: without breaking the signature (RFC 6376 §8.15).
SIGNED_HEADERS = frozenset(
    {
        b"from",
        b"to",
        b"cc",
        b"subject",
        b"date",
        b"message-id",
        b"reply-to",
        b"in-reply-to",
        b"references",
        b"mime-version",
        b"content-type",
        b"content-transfer-encoding",
    }
)
_NAME = b"DKIM-Signature"

_WSP_RUN = re.compile(b"[\t ]+")
_WSP_EOL = re.compile(b"[\t ]+\r\n")


class Relaxed:
    """RFC 6376 §3.4.2/§3.4.4 relaxed canonicalisation, byte for byte dkimpy's.

    dkimpy's ``Relaxed`` runs two regular expressions per header field through
    ``re.sub`` (a pattern-cache lookup each time), most of them on values with nothing
    to change: at 1 KiB that was over half of an Ed25519 signature's cost. Here each
    substitution runs only when its input holds what it would replace.
    tests/test_dkim.py checks the two agree on arbitrary bytes.
    """

    name = b"relaxed"  # what dkimpy's CanonicalizationPolicy reads back as the c= value

    @staticmethod
    def canonicalize_headers(headers: Sequence[Sequence[bytes]]) -> list[list[bytes]]:
        return [[name.lower().rstrip(), Relaxed.header_value(value)] for name, value in headers]

    @staticmethod
    def header_value(value: bytes) -> bytes:
        # bytes.replace does what dkimpy's substitutions do (\r?\n removed, runs of
        # tabs and spaces made one space) in a fraction of the time of re.sub.
        if b"\n" in value:
            value = value.replace(b"\r\n", b"").replace(b"\n", b"")
        if b"\t" in value:
            value = value.replace(b"\t", b" ")
        while b"  " in value:
            value = value.replace(b"  ", b" ")
        return value.strip() + b"\r\n"

    @staticmethod
    def canonicalize_body(body: bytes) -> bytes:
        if b" \r\n" in body or b"\t\r\n" in body:
            body = _WSP_EOL.sub(b"\r\n", body)
        if b"\t" in body or b"  " in body:
            body = _WSP_RUN.sub(b" ", body)
        return correct_empty_body(strip_trailing_lines(body))  # type: ignore[no-any-return]


_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")


def rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse`` (header fields, CRLF body), byte for byte, and its errors.

    dkimpy splits the whole message into lines and joins the body's back together; with
    only CRLF line ends, as SMTP DATA has, the body is already what that gives, so only
    the header block is split here. Anything else goes to dkimpy. tests/test_dkim.py
    checks the two agree on arbitrary bytes.
    """
    if message.count(b"\n") != message.count(b"\r\n"):
        return dkim.rfc822_parse(message)  # type: ignore[no-any-return]
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return dkim.rfc822_parse(message)  # type: ignore[no-any-return]
    headers: list[list[bytes]] = []
    match = _FIELD_NAME.match
    for line in message[:end].split(b"\r\n"):
        if line[0] in (9, 32):
            headers[-1][1] += line + b"\r\n"  # IndexError first, as in dkimpy
            continue
        field = match(line)
        if field is not None:
            headers.append([field.group(1), line[field.end(0) :] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return headers, message[end + 4 :]


# The common shapes, ``Name <local@domain>`` and ``local@domain``, without the cost of
# the email package's full address parser (which handles everything else).
_SIMPLE_FROM = re.compile(
    rb'\s*(?:(?:"[^"\\\r\n]*"|[^"<>@,;:()\\\r\n]*)\s*<[^<>@\s"(),;:\\]+@([A-Za-z0-9.-]+)>'
    rb'|[^<>@\s"(),;:\\]+@([A-Za-z0-9.-]+))\s*'
)


def from_domains(headers: Sequence[Sequence[bytes]]) -> list[str]:
    """Lower-cased domains of the From: mailboxes, in order (RFC 5322 §3.6.2)."""
    values = [value for name, value in headers if name.lower() == b"from"]
    if len(values) == 1:
        simple = _SIMPLE_FROM.fullmatch(values[0])
        if simple:
            domain = simple.group(1) or simple.group(2)
            return [domain.decode("ascii").rstrip(".").lower()]
    domains = []
    for _, address in getaddresses([v.decode("utf-8", "replace") for v in values]):
        _, at, domain = address.rpartition("@")
        if at and domain:
            domains.append(domain.strip().rstrip(".").lower())
    return domains


class Signer:
    """Signs with the configured keys whose domain covers the From: domain."""

    def __init__(self, keys: Sequence[DkimKey]) -> None:
        self.by_domain: dict[str, list[DkimKey]] = {}
        for key in keys:
            self.by_domain.setdefault(key.domain.lower(), []).append(key)

    def __bool__(self) -> bool:
        return bool(self.by_domain)

    def keys_for(self, domain: str) -> list[DkimKey]:
        """The entries of the closest configured domain: ``a.b.example.org`` uses
        ``b.example.org``'s keys if there are any, else ``example.org``'s."""
        labels = domain.lower().split(".")
        for start in range(len(labels)):
            keys = self.by_domain.get(".".join(labels[start:]))
            if keys:
                return keys
        return []

    def sign(self, message: bytes, *, now: float | None = None) -> bytes:
        """``DKIM-Signature:`` fields (CRLF-terminated) to put on top of *message*, or b""
        when no key covers its From: domain or it has no parsable header."""
        if not self.by_domain:
            return b""
        try:
            headers, body = rfc822_parse(message)
        except (dkim.MessageFormatError, IndexError):  # IndexError: a continuation line first
            return b""
        keys: list[DkimKey] = []
        for domain in from_domains(headers):
            keys = self.keys_for(domain)
            if keys:
                break
        if not keys:
            return b""
        include = [name.lower() for name, _ in headers if name.lower() in SIGNED_HEADERS]
        include.append(b"from")
        body_hash = base64.b64encode(hashlib.sha256(Relaxed.canonicalize_body(body)).digest())
        # Only fields named in h= enter the hash; canonicalising the rest is wasted work.
        canonical = Relaxed.canonicalize_headers(
            [h for h in headers if h[0].lower() in SIGNED_HEADERS]
        )
        stamp = str(int(time.time() if now is None else now)).encode("ascii")
        return b"".join(_signature(key, canonical, include, body_hash, stamp) for key in keys)


def _signature(
    key: DkimKey, canonical: list[list[bytes]], include: list[bytes], body_hash: bytes, stamp: bytes
) -> bytes:
    """One DKIM-Signature field, hashed the way dkimpy's ``DomainSigner.gen_header`` does."""
    tags = _fold_tags(
        [
            (b"v", b"1"),
            (b"a", key.dkim_algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", key.domain.encode("ascii")),
            (b"s", key.selector.encode("ascii")),
            (b"t", stamp),
            (b"h", b":".join(include)),
            (b"bh", body_hash),
        ]
    )
    # b= last, on lines of its own: while hashing it is empty (RFC 6376 §3.7), and the
    # real value then changes nothing before it.
    digest = header_digest(canonical, include, tags + _b_tag(b""))
    private = key.private
    if isinstance(private, rsa.RSAPrivateKey):
        signature = private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    else:
        signature = private.sign(digest)  # RFC 8463 §3: Ed25519 over the SHA-256 digest
    return _NAME + b":" + tags + _b_tag(base64.b64encode(signature)) + b"\r\n"


def header_digest(canonical: list[list[bytes]], include: list[bytes], signature: bytes) -> bytes:
    """SHA-256 of the signed fields, as dkimpy's ``hash_headers`` computes it for relaxed.

    RFC 6376 §5.4.2: each name in h= takes the last instance of that field not yet
    taken (none: nothing, which is how over-signing From works), then the signature
    field itself without its final CRLF. *canonical* is relaxed already (names
    lowercased); *signature* is the DKIM-Signature value with b= empty, so dkimpy's
    b= removal has nothing to remove. tests/test_dkim.py checks the two agree.
    """
    hasher = hashlib.sha256()
    taken: dict[bytes, int] = {}
    for name in include:
        index = taken.get(name, len(canonical))
        while index > 0:
            index -= 1
            if canonical[index][0] == name:
                hasher.update(name + b":" + canonical[index][1])
                break
        taken[name] = index
    hasher.update(b"dkim-signature:" + Relaxed.header_value(signature).rstrip())
    return hasher.digest()


_WIDTH = 78  # RFC 5322 §2.1.1: lines of at most 78 characters


def _fold_tags(fields: list[tuple[bytes, bytes]]) -> bytes:
    """``tag=value;`` for each field, folded only where RFC 6376 §3.5 allows white space:
    between tags, and inside ``h=`` after a colon.

    Not dkimpy's ``fold``: finding no space within 72 columns, it cuts there, which in a
    long ``h=`` falls inside a header name (``mi\\r\\n me-version``). A verifier then reads
    a name no field has, and the signature fails everywhere.
    """
    out = bytearray()
    column = len(_NAME) + 1  # after "DKIM-Signature:"
    for tag, value in fields:
        words = [tag + b"=" + value + b";"]
        if tag == b"h":
            names = value.split(b":")
            words = [name + b":" for name in names[:-1]] + [names[-1] + b";"]
            words[0] = b"h=" + words[0]
        for index, word in enumerate(words):
            space = b" " if index == 0 else b""
            if column + len(space) + len(word) > _WIDTH:
                out += b"\r\n "
                column = 1
            else:
                out += space
                column += len(space)
            out += word
            column += len(word)
    return bytes(out)


def _b_tag(value: bytes) -> bytes:
    """``b=`` on lines of its own, base64 cut anywhere (FWS may go between any two of its
    characters)."""
    text = b"b=" + value
    width = _WIDTH - 1
    return b"".join(b"\r\n " + text[i : i + width] for i in range(0, len(text), width))
