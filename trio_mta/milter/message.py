"""A received message as milters see it: its header fields, then a body source.

Headers are parsed from the start of the message (bounded: ``MAX_HEADER``);
the body stays where it is (bytes, or the rest of a spool file) until a
milter replaces it. Modifications are applied in place, so the next milter
in the list sees the result, and :meth:`MilterMessage.chunks` writes the
final message out piece by piece.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from trio_mta.milter.protocol import Modification

MAX_HEADER = 1 << 20
READ_CHUNK = 1 << 20


@dataclass
class Header:
    name: str
    value: str  # as milters get it: folds joined by "\n", the space after the colon kept
    raw: bytes | None = None  # the original lines, while unchanged

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        value = self.value.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
        sep = "" if value[:1] in (" ", "\t") else " "
        return f"{self.name}:{sep}{value}\r\n".encode("utf-8", "surrogateescape")


def parse_headers(data: bytes) -> tuple[list[Header], int]:
    """The header fields at the start of ``data`` and where the body begins.

    A line that is no header field (no colon, or starting the body) ends the
    header section, as in RFC 5322; the blank line is not part of the body.
    """
    headers: list[Header] = []
    pos = 0
    end = len(data)
    while pos < end:
        nl = data.find(b"\n", pos)
        line_end = end if nl < 0 else nl + 1
        line = data[pos:line_end]
        if line in (b"\r\n", b"\n"):
            return headers, line_end
        if line[:1] in (b" ", b"\t") and headers:
            h = headers[-1]
            assert h.raw is not None
            h.raw += line
            h.value += "\n" + line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        else:
            name, colon, value = line.partition(b":")
            if not colon or not name or b" " in name.strip() or nl < 0:
                return headers, pos
            headers.append(
                Header(
                    name.decode("utf-8", "surrogateescape").strip(),
                    value.rstrip(b"\r\n").decode("utf-8", "surrogateescape"),
                    line,
                )
            )
        pos = line_end
    return headers, pos


@dataclass
class MilterMessage:
    """Headers plus a body: in-memory bytes, or ``path`` from ``offset`` to its end."""

    headers: list[Header]
    body: bytes = b""
    path: Path | None = None
    offset: int = 0
    changed: bool = False
    _replaced: list[bytes] = field(default_factory=list)

    @classmethod
    def from_parts(
        cls, head: bytes, body: bytes | None, path: Path | None, first: bytes = b""
    ) -> MilterMessage:
        """``head`` + ``body`` in memory, or ``head`` + the file at ``path``
        (whose first bytes are ``first``)."""
        if path is None:
            data = head + (body or b"")
            headers, start = parse_headers(data[:MAX_HEADER])
            return cls(headers, body=data[start:])
        data = head + first[:MAX_HEADER]
        headers, start = parse_headers(data)
        if start < len(head):
            return cls(headers, body=head[start:] + first, path=path, offset=len(first))
        return cls(headers, path=path, offset=start - len(head))

    def body_chunks(self) -> Iterator[bytes]:
        """The body; blocking reads for a file body (run it in a thread)."""
        if self.body:
            yield self.body
        if self.path is not None:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                while chunk := f.read(READ_CHUNK):
                    yield chunk

    def chunks(self) -> Iterator[bytes]:
        yield b"".join(h.encode() for h in self.headers) + b"\r\n"
        yield from self.body_chunks()

    def apply(self, mods: tuple[Modification, ...]) -> None:
        """Header and body changes; envelope changes are the caller's."""
        replaced: list[bytes] = []
        for mod in mods:
            if mod.kind == "add_header":
                self.headers.append(Header(mod.name, mod.value))
            elif mod.kind == "insert_header":
                self.headers.insert(min(mod.index, len(self.headers)), Header(mod.name, mod.value))
            elif mod.kind == "change_header":
                self._change(mod)
            elif mod.kind == "replace_body":
                replaced.append(mod.body)
            else:
                continue
            self.changed = True
        if replaced:
            self.body, self.path, self.offset = b"".join(replaced), None, 0

    def _change(self, mod: Modification) -> None:
        """The ``index``-th (from 1) field called ``name``; empty value deletes it."""
        seen = 0
        for i, h in enumerate(self.headers):
            if h.name.lower() == mod.name.lower():
                seen += 1
                if seen == max(mod.index, 1):
                    if mod.value:
                        self.headers[i] = Header(h.name, mod.value)
                    else:
                        del self.headers[i]
                    return
        if mod.value:
            self.headers.append(Header(mod.name, mod.value))
