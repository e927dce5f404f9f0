"""Make every line of an outgoing message fit SMTP's 998 octets (RFC 5321 §4.5.3.1.6).

Mail can arrive with longer lines (our server accepts them, as Postfix does),
but the next hop may refuse them (``500 Line too long``) and the message would
bounce. So on the way out, as Postfix's ``smtp_line_length_limit`` does, lines
are made to fit, doing as little damage as possible:

- a header line is folded at whitespace (RFC 5322 §2.2.3: CRLF inserted before
  a space, so the field unfolds to exactly what it was);
- the body of a non-MIME or single-part text message whose transfer encoding
  is 7bit/8bit/binary is re-encoded as quoted-printable (RFC 2045 §6.7) and its
  ``Content-Transfer-Encoding`` (and ``MIME-Version``) set: decoding gives back
  the original body byte for byte;
- anything else (a multipart body, a header word longer than a line) is broken
  as Postfix breaks it: CRLF and a space inserted, never inside a UTF-8
  sequence.

A message whose lines all fit is returned as it is (the same object). Pure
function over bytes: no I/O.
"""

from __future__ import annotations

import binascii
import re
from typing import Final

__all__ = ["MAX_LINE", "fit_lines"]

MAX_LINE: Final = 998  # octets, CRLF excluded
_TOO_LONG: Final = re.compile(rb"[^\r\n]{%d}" % (MAX_LINE + 1))
_FIELD: Final = re.compile(rb"([!-9;-~]+)[ \t]*:")  # RFC 5322 §3.6.8 field name
_WSP: Final = b" \t"
_QP_ABLE: Final = frozenset({b"", b"7bit", b"8bit", b"binary"})


def fit_lines(data: bytes, limit: int = MAX_LINE) -> bytes:
    """``data`` (CRLF lines) with no line longer than ``limit`` octets; see the module doc."""
    if limit < 78:
        raise ValueError("limit must leave room for a folded header line (at least 78)")
    if not _too_long(data, limit):
        return data
    header, separator, body = _split(data)
    if _too_long(body, limit) and _qp_able(header):
        header = _as_quoted_printable(header)
        body = _quoted_printable(body)
    head = b"".join(piece + b"\r\n" for line in header for piece in _fold(line, limit))
    if _too_long(body, limit):
        body = b"\r\n".join(
            piece for line in body.split(b"\r\n") for piece in _break(line, limit, b" ")
        )
    return head + separator + body


def _too_long(data: bytes, limit: int) -> bool:
    if limit == MAX_LINE:
        return _TOO_LONG.search(data) is not None
    return any(len(line) > limit for line in data.split(b"\r\n"))


def _split(data: bytes) -> tuple[list[bytes], bytes, bytes]:
    """Header lines (line ends removed), the empty line (or b"") and the body.

    Without an empty line the header ends at the first line that is neither a
    field nor a continuation, as dsn reads it, so body text never passes for a
    header to be folded.
    """
    start = 0
    lines: list[bytes] = []
    while start < len(data):
        end = data.find(b"\r\n", start)
        if end < 0:
            end = len(data)
        line = data[start:end]
        if line == b"":
            return lines, data[end : end + 2], data[end + 2 :]
        continuation = line[:1] in (b" ", b"\t") and bool(lines)
        if not continuation and not _FIELD.match(line):
            return lines, b"", data[start:]
        lines.append(line)
        start = end + 2
    return lines, b"", b""


def _field_name(line: bytes) -> bytes | None:
    match = _FIELD.match(line)
    return match.group(1).lower() if match else None


def _fields(header: list[bytes]) -> dict[bytes, bytes]:
    """Lower-cased name to unfolded value of the first occurrence of each field."""
    out: dict[bytes, bytes] = {}
    current: bytes | None = None  # the field continuation lines belong to, if it counts
    for line in header:
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                out[current] += line
            continue
        name = _field_name(line)
        current = name if name is not None and name not in out else None
        if current is not None:
            out[current] = line.partition(b":")[2]
    return out


def _qp_able(header: list[bytes]) -> bool:
    """A body we may re-encode: not multipart, not a message, in an identity encoding."""
    fields = _fields(header)
    encoding = fields.get(b"content-transfer-encoding", b"").strip().lower()
    if encoding not in _QP_ABLE:
        return False
    content_type = fields.get(b"content-type")
    if content_type is None:
        return True  # RFC 2045 §5.2: text/plain
    media = content_type.split(b";")[0].strip().lower()
    return media.startswith(b"text/")


def _as_quoted_printable(header: list[bytes]) -> list[bytes]:
    """The header with its transfer encoding replaced by quoted-printable."""
    out: list[bytes] = []
    dropping = False
    mime_version = False
    for line in header:
        if line[:1] in (b" ", b"\t") and out:
            if not dropping:
                out.append(line)
            continue
        name = _field_name(line)
        dropping = name == b"content-transfer-encoding"
        mime_version = mime_version or name == b"mime-version"
        if not dropping:
            out.append(line)
    if not mime_version:
        out.append(b"MIME-Version: 1.0")
    out.append(b"Content-Transfer-Encoding: quoted-printable")
    return out


def _quoted_printable(body: bytes) -> bytes:
    """RFC 2045 §6.7: each CRLF line encoded on its own, soft breaks as "=" CRLF.

    Bare CR and LF inside a line are encoded (=0D, =0A), so decoding gives back
    exactly ``body``.
    """
    lines = body.split(b"\r\n")
    encoded = [
        binascii.b2a_qp(line, quotetabs=False, istext=False).replace(b"\n", b"\r\n")
        for line in lines
    ]
    return b"\r\n".join(encoded)


def _fold(line: bytes, limit: int) -> list[bytes]:
    """A header line as physical lines of at most ``limit`` octets.

    Folds before the last whitespace that fits, never leaving a line of only
    whitespace; a stretch with no usable whitespace is broken with CRLF SP.
    """
    pieces: list[bytes] = []
    while len(line) > limit:
        cut = _fold_point(line, limit)
        if cut is None:
            head, line = _hard_cut(line, limit)
            pieces.append(head)
            line = b" " + line
            continue
        pieces.append(line[:cut])
        line = line[cut:]
    pieces.append(line)
    return pieces


def _fold_point(line: bytes, limit: int) -> int | None:
    """The last index <= limit holding whitespace with text on both sides of it."""
    for cut in range(limit, 0, -1):
        if line[cut] in _WSP and line[:cut].strip(_WSP) and line[cut:].strip(_WSP):
            return cut
    return None


def _break(line: bytes, limit: int, continuation: bytes) -> list[bytes]:
    """Postfix's way: CRLF plus ``continuation`` inserted every ``limit`` octets."""
    pieces: list[bytes] = []
    while len(line) > limit:
        head, line = _hard_cut(line, limit)
        pieces.append(head)
        line = continuation + line
    pieces.append(line)
    return pieces


def _hard_cut(line: bytes, at: int) -> tuple[bytes, bytes]:
    """Split at ``at`` octets, moved back (by up to 3) off the middle of a UTF-8 sequence."""
    cut = at
    while cut > at - 3 and (line[cut] & 0xC0) == 0x80:
        cut -= 1
    return line[:cut], line[cut:]
