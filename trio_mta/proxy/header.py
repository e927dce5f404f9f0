"""Parse (and, for tests and the fuzzer, format) one PROXY protocol header.

The format is HAProxy's ``proxy-protocol.txt``:

- version 1 is one text line, ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` or
  ``PROXY UNKNOWN ...\\r\\n``, 107 bytes at most with its CRLF;
- version 2 is binary: a 12-byte signature, version/command, family/transport,
  a 16-bit length, the addresses, then type-length-value extensions (TLVs).

:func:`parse_header` is a pure function of the bytes received so far: a
header and how many bytes it took, :data:`NEED_DATA`, or
:class:`ProxyHeaderError`. The decision never depends on how the bytes were
split, and every error is reported as soon as the bytes rule the header out,
so a client that does not speak the protocol is refused at once instead of
waiting for a timeout. Bounds are checked before every slice: a hostile
length can make the parser wait for more bytes (at most 65 551 in all), never
read past what it was given.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
MAX_V1_LENGTH: Final = 107  # the longest TCP6 line, CRLF included
V2_FIXED: Final = 16  # signature, version/command, family, length
MAX_V2_LENGTH: Final = V2_FIXED + 0xFFFF

Command = Literal["PROXY", "LOCAL"]
Family = Literal["TCP4", "TCP6", "UNIX", "UNKNOWN"]

# Family/transport byte of version 2 -> (family, address block length).
_V2_STREAM_FAMILIES: Final[dict[int, tuple[Family, int]]] = {
    0x00: ("UNKNOWN", 0),
    0x11: ("TCP4", 12),
    0x21: ("TCP6", 36),
    0x31: ("UNIX", 216),
}
_V2_DATAGRAM_FAMILIES: Final = frozenset({0x12, 0x22, 0x32})
_V2_FAMILY_BYTES: Final[dict[Family, int]] = {
    family: byte for byte, (family, _) in _V2_STREAM_FAMILIES.items()
}


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _Sentinel.NEED_DATA
NeedData: TypeAlias = Literal[_Sentinel.NEED_DATA]


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; ``str()`` says why, in one line."""


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed header.

    ``source`` and ``destination`` are ``(ip, port)`` for TCP4/TCP6 and None
    otherwise: a ``LOCAL`` command (the proxy's own health check), ``UNKNOWN``
    or a UNIX socket carry no client IP, and the connection's own addresses
    apply. ``tlvs`` are version 2's extensions as ``(type, value)``, in order.
    """

    version: Literal[1, 2]
    command: Command = "PROXY"
    family: Family = "UNKNOWN"
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def client(self) -> tuple[str, int] | None:
        """The real client's (ip, port), None when the header names no IP client."""
        return self.source if self.command == "PROXY" else None


def parse_header(data: bytes) -> tuple[ProxyHeader, int] | NeedData:
    """The header at the start of ``data`` and its length, or NEED_DATA; raises
    :class:`ProxyHeaderError` as soon as ``data`` cannot begin a valid header."""
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        if len(data) < len(V2_SIGNATURE):
            return NEED_DATA
        return _parse_v2(data)
    if data[: len(V1_PREFIX)] == V1_PREFIX[: len(data)]:
        return _parse_v1(data) if len(data) >= len(V1_PREFIX) else NEED_DATA
    raise ProxyHeaderError("not a PROXY protocol header")


class ProxyHeaderReader:
    """Accumulates received bytes until :func:`parse_header` decides (h11 style).

    After the header, ``trailing_data`` holds what the client sent behind it
    (an early talker's first command): it belongs to the next protocol.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._header: ProxyHeader | None = None
        self.trailing_data = b""

    def receive_data(self, data: bytes) -> None:
        if self._header is not None:
            self.trailing_data += data
        else:
            self._buffer += data

    def next_event(self) -> ProxyHeader | NeedData:
        """The header once complete, else NEED_DATA; raises :class:`ProxyHeaderError`."""
        if self._header is not None:
            return self._header
        result = parse_header(self._buffer)
        if result is NEED_DATA:
            return NEED_DATA
        self._header, used = result
        self.trailing_data, self._buffer = self._buffer[used:], b""
        return self._header


# -- version 1 --------------------------------------------------------------------------


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | NeedData:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyHeaderError(f"version 1 header longer than {MAX_V1_LENGTH} bytes")
        _check_v1_text(data[:-1] if data.endswith(b"\r") else data)
        return NEED_DATA
    line = data[:end]
    _check_v1_text(line)
    parts = line.decode("ascii").split(" ")
    if parts[1] == "UNKNOWN":  # the receiver ignores whatever follows (the spec says so)
        return ProxyHeader(1, "PROXY", "UNKNOWN"), end + 2
    if parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(
            f"version 1 protocol must be TCP4, TCP6 or UNKNOWN, got {parts[1][:16]!r}"
        )
    family: Family = "TCP4" if parts[1] == "TCP4" else "TCP6"
    if len(parts) != 6:
        raise ProxyHeaderError(
            f"version 1 {family} header needs 4 fields after the protocol, "
            f"each separated by one space"
        )
    source = _v1_ip(parts[2], family), _v1_port(parts[4])
    destination = _v1_ip(parts[3], family), _v1_port(parts[5])
    return ProxyHeader(1, "PROXY", family, source, destination), end + 2


def _check_v1_text(text: bytes) -> None:
    """Printable ASCII only (a CR or LF before the final CRLF is not part of a header)."""
    for byte in text:
        if not 0x20 <= byte <= 0x7E:
            raise ProxyHeaderError(f"version 1 header contains byte 0x{byte:02x}")


def _v1_ip(text: str, family: Family) -> str:
    try:
        if family == "TCP4":
            return str(ipaddress.IPv4Address(text))
        if "%" in text:  # a scope id names an interface of the proxy, never a client
            raise ValueError(text)
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ProxyHeaderError(f"version 1 {family} header: bad address {text[:46]!r}") from None


def _v1_port(text: str) -> int:
    if not (1 <= len(text) <= 5 and text.isascii() and text.isdigit()) or int(text) > 0xFFFF:
        raise ProxyHeaderError(f"version 1 header: bad port {text[:8]!r}")
    return int(text)


# -- version 2 --------------------------------------------------------------------------


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | NeedData:
    if len(data) < V2_FIXED:
        return NEED_DATA
    version, command_code = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"version 2 signature with version nibble {version}")
    if command_code > 1:
        raise ProxyHeaderError(f"version 2 command 0x{command_code:x} is neither LOCAL nor PROXY")
    command: Command = "PROXY" if command_code else "LOCAL"
    family_byte = data[13]
    length = int.from_bytes(data[14:16], "big")
    total = V2_FIXED + length
    if command == "LOCAL":
        # The proxy speaking for itself (a health check): the family and
        # addresses, whatever they are, must be ignored.
        if len(data) < total:
            return NEED_DATA
        return ProxyHeader(2, "LOCAL", "UNKNOWN"), total
    if family_byte in _V2_DATAGRAM_FAMILIES:
        raise ProxyHeaderError("version 2 header for a datagram connection on a TCP listener")
    if family_byte not in _V2_STREAM_FAMILIES:
        raise ProxyHeaderError(f"version 2 family/transport 0x{family_byte:02x} is not defined")
    family, address_length = _V2_STREAM_FAMILIES[family_byte]
    if length < address_length:
        raise ProxyHeaderError(
            f"version 2 {family} header of {length} bytes cannot hold "
            f"its {address_length} address bytes"
        )
    if len(data) < total:
        return NEED_DATA
    block = data[V2_FIXED:total]
    if family == "UNKNOWN":  # unspecified protocol: use the connection's own addresses
        return ProxyHeader(2, "PROXY", "UNKNOWN"), total
    source = destination = None
    if family == "TCP4":
        source = str(ipaddress.IPv4Address(block[0:4])), int.from_bytes(block[8:10], "big")
        destination = str(ipaddress.IPv4Address(block[4:8])), int.from_bytes(block[10:12], "big")
    elif family == "TCP6":
        source = str(ipaddress.IPv6Address(block[0:16])), int.from_bytes(block[32:34], "big")
        destination = (
            str(ipaddress.IPv6Address(block[16:32])),
            int.from_bytes(block[34:36], "big"),
        )
    tlvs = _parse_tlvs(block[address_length:])
    return ProxyHeader(2, "PROXY", family, source, destination, tlvs), total


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """Type (1 byte), length (2), value; each must end within the header."""
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyHeaderError(
                f"version 2 header ends inside a TLV's type and length "
                f"({len(data) - offset} bytes left)"
            )
        kind = data[offset]
        size = int.from_bytes(data[offset + 1 : offset + 3], "big")
        start = offset + 3
        if start + size > len(data):
            raise ProxyHeaderError(
                f"version 2 TLV 0x{kind:02x} of {size} bytes overruns the "
                f"header ({len(data) - start} left)"
            )
        tlvs.append((kind, data[start : start + size]))
        offset = start + size
    return tuple(tlvs)


# -- formatting (tests, the fuzzer) ---------------------------------------------------------


def format_v1(header: ProxyHeader) -> bytes:
    """The version 1 line for ``header`` (TCP4, TCP6 or UNKNOWN)."""
    if header.family == "UNKNOWN" or header.source is None or header.destination is None:
        return b"PROXY UNKNOWN\r\n"
    (src, sport), (dst, dport) = header.source, header.destination
    return f"PROXY {header.family} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def format_v2(header: ProxyHeader) -> bytes:
    """The version 2 bytes for ``header``; a LOCAL command carries no addresses."""
    if header.command == "LOCAL":
        return V2_SIGNATURE + bytes([0x20, 0x00]) + (0).to_bytes(2, "big")
    block = b""
    if header.family in ("TCP4", "TCP6") and header.source and header.destination:
        (src, sport), (dst, dport) = header.source, header.destination
        block = (
            ipaddress.ip_address(src).packed
            + ipaddress.ip_address(dst).packed
            + sport.to_bytes(2, "big")
            + dport.to_bytes(2, "big")
        )
    elif header.family == "UNIX":
        block = bytes(216)
    if header.family != "UNKNOWN":
        for kind, value in header.tlvs:
            block += bytes([kind]) + len(value).to_bytes(2, "big") + value
    family = _V2_FAMILY_BYTES[header.family]
    return V2_SIGNATURE + bytes([0x21, family]) + len(block).to_bytes(2, "big") + block
