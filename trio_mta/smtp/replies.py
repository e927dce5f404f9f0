"""SMTP replies: the value type, its wire form, and an incremental parser.

A reply is a code, an optional RFC 3463 enhanced status code and text lines.
RFC 2034 §3 puts the enhanced code on every line of a multi-line reply, so
:meth:`Reply.format` repeats it; :class:`ReplyParser` (client side) accepts
servers that only put it on some lines, or on none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trio_mta.smtp.errors import ReplyError

# RFC 3463 §2: class "." subject "." detail; class is 2, 4 or 5.
_STATUS_RE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
# The same at the start of a received text line, followed by SP or end of line.
_LEADING_STATUS_RE = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |\Z)")

#: A reply line longer than this without a line end is garbage, not a slow server.
MAX_REPLY_LINE = 65536
#: More lines than this in one reply is a server feeding us forever.
MAX_REPLY_LINES = 1000


@dataclass(frozen=True, init=False)
class Reply:
    """One SMTP reply. ``Reply(250, "2.1.0", "Ok")`` and tuples of lines both work."""

    code: int
    status: str | None
    lines: tuple[str, ...]

    def __init__(self, code: int, status: str | None, lines: str | tuple[str, ...] = ()) -> None:
        lines = (lines,) if isinstance(lines, str) else tuple(lines)
        if not 200 <= code <= 599:
            raise ValueError(f"reply code out of range: {code!r}")
        if status is not None and not _STATUS_RE.match(status):
            raise ValueError(f"malformed enhanced status code: {status!r}")
        for line in lines:
            # A CR or LF in the text would let it forge further replies.
            if "\r" in line or "\n" in line:
                raise ValueError(f"line break inside reply text: {line!r}")
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "lines", lines)

    def format(self) -> bytes:
        """Wire form: one CRLF-terminated line per text line (at least one)."""
        lines = self.lines or ("",)
        last = len(lines) - 1
        out = []
        for i, line in enumerate(lines):
            text = f"{self.status} {line}" if self.status and line else (self.status or line)
            out.append(f"{self.code}{' ' if i == last else '-'}{text}\r\n")
        return "".join(out).encode("utf-8")

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def is_success(self) -> bool:
        """2xx: the command was accepted (RFC 5321 §4.2.1)."""
        return 200 <= self.code < 300

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_intermediate(self) -> bool:
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.status, self.text) if part)


class ReplyParser:
    """Incremental reply parser for the client side.

    Tolerant where real servers are sloppy (``"250"`` with no text, LF-only
    line ends, enhanced codes on some lines only), strict where sloppiness
    means we are no longer talking SMTP (non-numeric codes, codes changing
    inside one multi-line reply, bare CR inside a line).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._lines: list[tuple[int, str]] = []

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> bytes:
        """Bytes received but not yet parsed into a complete reply."""
        return bytes(self._buf[self._pos :])

    def clear(self) -> bytes:
        """Drop everything buffered (after STARTTLS) and return what was dropped."""
        dropped = self.buffered
        self._buf.clear()
        self._pos = 0
        self._lines.clear()
        return dropped

    def next_reply(self) -> Reply | None:
        while True:
            end = self._buf.find(b"\n", self._pos)
            if end < 0:
                if len(self._buf) - self._pos > MAX_REPLY_LINE:
                    raise ReplyError("reply line too long")
                return None
            raw = bytes(self._buf[self._pos : end])
            self._pos = end + 1
            code, last, text = _split_line(raw)
            if self._lines and self._lines[0][0] != code:
                raise ReplyError(f"reply code changed inside a multi-line reply: {raw!r}")
            self._lines.append((code, text))
            if len(self._lines) > MAX_REPLY_LINES:
                raise ReplyError("too many lines in one reply")
            if last:
                return self._build()

    def _build(self) -> Reply:
        code = self._lines[0][0]
        status: str | None = None
        texts = []
        for _, text in self._lines:
            match = _LEADING_STATUS_RE.match(text)
            # RFC 3463 §2: the class digit equals the reply's first digit.
            if match and match.group(1)[0] == str(code)[0]:
                status = status or match.group(1)
                text = text[match.end() :]
            texts.append(text)
        self._lines.clear()
        return Reply(code, status, tuple(texts))


def _split_line(raw: bytes) -> tuple[int, bool, str]:
    """(code, is_last_line, text) of one received line, CR/LF removed."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if b"\r" in raw:
        raise ReplyError(f"bare CR in reply line: {raw[:80]!r}")
    head = raw[:3]
    sep = raw[3:4]
    if not (len(head) == 3 and head.isdigit() and sep in (b"", b" ", b"-")):
        raise ReplyError(f"malformed reply line: {raw[:80]!r}")
    code = int(head)
    if not 200 <= code <= 599:
        raise ReplyError(f"reply code out of range: {raw[:80]!r}")
    return code, sep != b"-", raw[4:].decode("utf-8", errors="replace")
