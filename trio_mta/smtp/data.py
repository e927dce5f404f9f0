"""DATA framing (RFC 5321 §4.5.2, §4.1.1.4) and BDAT framing (RFC 3030 §2).

The end of the mail data is exactly CRLF "." CRLF. A lone LF or CR is never
a line end here: accepting ``<LF>.<CR><LF>`` and friends as the end is what
made SMTP smuggling possible (CVE-2023-51764/51765/51766), so such bytes only
set :attr:`DataReader.bad_line_ending` and the server refuses the message.

Scanning is done by C code over whole chunks, never a Python loop per byte:
one regex pass finds the CRs that start a dot-line ("\r\n.", the end marker
being one of them) or that are not followed by LF; ``translate`` then counts
the remaining LFs. Only the rare dot-lines and bare CRs reach Python. A chunk
is split into a "segment" processed now and a held-back suffix of at most four
bytes that could begin the end marker; a segment therefore never ends inside a
CRLF, which keeps the per-segment checks exact for any split of the input.

BDAT needs no end marker: :class:`BdatReader` counts each chunk's octets out
of the server's buffer (by offset, without copying what follows) and applies
the same size limit and bare CR/LF rule across chunk borders.
"""

from __future__ import annotations

import re

from trio_mta.smtp.errors import LocalProtocolError

_MARK = b"\r\n.\r\n"
_MARK_PREFIXES = (_MARK[:4], _MARK[:3], _MARK[:2], _MARK[:1])


# Every byte but CR and LF: translate(None, _NOT_CR_LF) keeps only the line-end bytes.
_NOT_CR_LF = bytes(b for b in range(256) if b not in (0x0D, 0x0A))
# A CR not followed by LF (also at the very end). Its literal first byte lets
# sre skip from CR to CR in C.
_BARE_CR = re.compile(rb"\r(?!\n)")
# The same, or the CR of a CRLF that is followed by a dot (a dot-line or the end).
_SCAN = re.compile(rb"\r(?:\n\.|(?!\n))")


def _bare_lf_given_no_bare_cr(segment: bytes) -> bool:
    """With every CR followed by its LF, any LF beyond the CR count is a bare LF."""
    ends = segment.translate(None, _NOT_CR_LF)
    return len(ends) != 2 * ends.count(b"\r")


def has_bare_line_ending(segment: bytes) -> bool:
    """True when ``segment`` holds a CR not followed by LF or an LF not preceded by CR."""
    return _BARE_CR.search(segment) is not None or _bare_lf_given_no_bare_cr(segment)


def dot_stuff(body: bytes) -> bytes:
    """Wire form of ``body`` for DATA: CRLF line ends, dots doubled, ".\\r\\n" appended.

    Every bare LF, bare CR and CRLF becomes one CRLF, so the result can never
    hold an end marker (or a smuggling sequence) before its final line.
    """
    if has_bare_line_ending(body):
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    body = body.replace(b"\r\n.", b"\r\n..")  # RFC 5321 §4.5.2 transparency
    if body.startswith(b"."):
        body = b"." + body
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


class DataReader:
    """Server side: undo dot-stuffing and find the end of the data after 354.

    ``feed`` returns ``(body, remainder)``: the unstuffed body bytes available
    now (CRLF line ends, the final CRLF included) and, once the end marker was
    seen, the bytes that followed it (pipelined commands), else ``None``.
    Past ``max_size`` octets nothing more is passed on (:attr:`too_big`), so
    the bytes passed on are the same for every split of the input.
    """

    def __init__(self, max_size: int) -> None:
        self._max = max_size
        # The data starts as if preceded by CRLF (RFC 5321 §4.5.2: ".\r\n" first
        # is an empty message). Those two virtual bytes are held like any
        # other marker prefix and dropped from the output (_skip).
        self._hold = b"\r\n"
        self._skip = 2
        self._size = 0
        self._too_big = False
        self._bad = False
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def size(self) -> int:
        """Unstuffed octets seen so far (counted on after ``too_big``)."""
        return self._size

    @property
    def too_big(self) -> bool:
        return self._too_big

    @property
    def bad_line_ending(self) -> bool:
        return self._bad

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        if self._done:
            raise LocalProtocolError("DataReader.feed() after the end of the data")
        work = self._hold + data if self._hold else data
        hold = 0
        tail = work[-4:]
        for prefix in _MARK_PREFIXES:
            if tail.endswith(prefix):
                hold = len(prefix)
                break
        end = len(work) - hold  # of the segment processed now
        parts = []
        start = 0
        bare_cr = False
        for match in _SCAN.finditer(work):
            pos = match.start()
            if pos >= end:
                break  # in the held-back suffix: next time
            if match.end() - pos == 1:
                bare_cr = True
            elif work[pos + 3 : pos + 5] == b"\r\n":
                # CRLF "." CRLF: the end. Its first CRLF ends the last line of the body.
                parts.append(work[start : pos + 2])
                self._done = True
                self._hold = b""
                return self._consume(parts, bare_cr), work[pos + 5 :]
            else:
                parts.append(work[start : pos + 2])  # RFC 5321 §4.5.2: drop the dot
                start = pos + 3
        self._hold = work[end:] if hold else b""
        parts.append(work[start:end] if start or hold else work)
        return self._consume(parts, bare_cr), None

    def _consume(self, parts: list[bytes], bare_cr: bool) -> bytes:
        """Account for an unstuffed segment (same CR/LF pairs as its stuffed form)."""
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        if not body:
            return b""
        if not self._bad and (bare_cr or _bare_lf_given_no_bare_cr(body)):
            self._bad = True
        if self._skip:
            dropped = min(self._skip, len(body))
            body = body[dropped:]
            self._skip -= dropped
        self._size += len(body)
        if self._too_big:
            return b""
        if self._size > self._max:
            # Pass exactly the first max_size octets whatever the split, then
            # discard (never buffer) but keep reading to the end.
            self._too_big = True
            return body[: len(body) - (self._size - self._max)]
        return body


class LineEndingChecker:
    """Tracks bare CR/LF across BDAT chunks, where a CRLF may straddle two chunks."""

    def __init__(self) -> None:
        self._cr_pending = False
        self._bad = False
        self._tail = b""

    @property
    def bad(self) -> bool:
        """A bare CR or LF was seen (call :meth:`finish` first for the last byte)."""
        return self._bad

    @property
    def ends_with_crlf(self) -> bool:
        """The content so far is empty or ends with CRLF."""
        return self._tail in (b"", b"\r\n")

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._tail = (self._tail + chunk[-2:])[-2:]
        if self._bad:
            return
        if self._cr_pending:
            self._cr_pending = False
            if chunk[:1] != b"\n":
                self._bad = True
                return
            chunk = chunk[1:]
        if chunk.endswith(b"\r"):
            self._cr_pending = True
            chunk = chunk[:-1]
        if has_bare_line_ending(chunk):
            self._bad = True

    def finish(self) -> None:
        """End of the content: a CR left waiting for its LF is a bare CR."""
        if self._cr_pending:
            self._bad = True
            self._cr_pending = False


class BdatReader:
    """Server side: the octets of one message sent as BDAT chunks (RFC 3030 §2).

    The server announces each chunk with :meth:`begin_chunk`, then calls
    :meth:`feed` on its receive buffer until :attr:`chunk_done`, and after the
    LAST chunk calls :meth:`finish`. As for DATA, only the first ``max_size``
    octets are passed on (the rest is only counted) and bare CR/LF only set
    :attr:`bad_line_ending`: we do not offer BINARYMIME, so stored mail must
    be CRLF text.
    """

    def __init__(self, max_size: int) -> None:
        self._max = max_size
        self._size = 0
        self._too_big = False
        self._check = LineEndingChecker()
        self._remaining = 0
        self._chunk_size = 0
        self._last = False
        self._finished = False

    @property
    def size(self) -> int:
        """Octets of the message so far (a CRLF added by :meth:`finish` included)."""
        return self._size

    @property
    def too_big(self) -> bool:
        return self._too_big

    @property
    def bad_line_ending(self) -> bool:
        """A bare CR or LF was seen (a CR at the very end counts after :meth:`finish`)."""
        return self._check.bad

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def last(self) -> bool:
        """The current chunk was announced with LAST."""
        return self._last

    @property
    def chunk_done(self) -> bool:
        return not self._remaining

    def begin_chunk(self, size: int, last: bool) -> None:
        if self._remaining or self._finished:
            raise LocalProtocolError("BdatReader.begin_chunk() inside a chunk or after LAST")
        self._remaining = self._chunk_size = size
        self._last = last

    def feed(self, buf: bytes, pos: int = 0) -> tuple[bytes, int]:
        """Take the current chunk's octets from ``buf[pos:]``.

        Returns the body bytes to pass on (``b""`` once too big) and the
        offset in ``buf`` where the chunk's octets stopped.
        """
        take = min(len(buf) - pos, self._remaining)
        if take <= 0:
            return b"", pos
        chunk = buf if take == len(buf) else buf[pos : pos + take]
        self._remaining -= take
        self._check.feed(chunk)
        self._size += take
        if self._too_big:
            return b"", pos + take
        if self._size > self._max:
            self._too_big = True  # as DataReader: the first max_size octets, then nothing
            return chunk[: take - (self._size - self._max)], pos + take
        return chunk, pos + take

    def finish(self) -> bytes:
        """After the LAST chunk: final checks; returns what to append to the body.

        RFC 3030 does not require the content to end in CRLF, but a stored
        message must, so a clean message lacking one gets ``b"\\r\\n"``.
        """
        if not self._last or self._remaining:
            raise LocalProtocolError("BdatReader.finish() before the end of the LAST chunk")
        self._finished = True
        self._check.finish()
        if self._check.bad or self._too_big or self._check.ends_with_crlf:
            return b""
        self._size += 2
        return b"\r\n"
