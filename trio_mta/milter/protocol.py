"""The Sendmail milter protocol, version 6 as Postfix speaks it: sans-IO.

Every packet is a 4-byte big-endian length, a command byte and its data (the
length counts the command byte). ``Milter`` encodes what the MTA sends for
each stage of a session and interprets what the milter answers; the trio
client (client.py) only moves bytes and keeps time. Nothing here does I/O.

A hostile or broken milter can only ever make :class:`MilterProtocolError`
come out of this module: oversized or short packets, unknown reply codes,
replies in the wrong stage, malformed fields.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

VERSION = 6
MAX_PACKET = 1 << 20  # what a milter may send in one packet; replbody comes in many
BODY_CHUNK = 65535  # MILTER_CHUNK_SIZE: the largest body packet a milter accepts

# Actions the milter may ask for (SMFIF_*).
ADDHDRS, CHGBODY, ADDRCPT, DELRCPT, CHGHDRS, QUARANTINE, CHGFROM, ADDRCPT_PAR, SETSYMLIST = (
    1 << i for i in range(9)
)
OUR_ACTIONS = ADDHDRS | CHGBODY | ADDRCPT | DELRCPT | CHGHDRS | QUARANTINE | CHGFROM | ADDRCPT_PAR

# Protocol steps (SMFIP_*): NO_* a stage is not sent, NR_* it gets no reply.
NOCONNECT, NOHELO, NOMAIL, NORCPT, NOBODY, NOHDRS, NOEOH, NR_HDR = (1 << i for i in range(8))
NOUNKNOWN, NODATA, SKIP, RCPT_REJ = 0x100, 0x200, 0x400, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA, NR_UNKN, NR_EOH, NR_BODY = (
    0x1000 << i for i in range(8)
)
HDR_LEADSPC = 0x100000
# Everything up to HDR_LEADSPC; we never send UNKNOWN and never send refused
# recipients, so a milter asking to skip the one or to see the other loses nothing.
OUR_PROTOCOL = 0x1FFFFF

# Stages: command byte, the flag that skips it, the flag that silences its reply.
STAGES: dict[str, tuple[bytes, int, int]] = {
    "connect": (b"C", NOCONNECT, NR_CONN),
    "helo": (b"H", NOHELO, NR_HELO),
    "mail": (b"M", NOMAIL, NR_MAIL),
    "rcpt": (b"R", NORCPT, NR_RCPT),
    "data": (b"T", NODATA, NR_DATA),
    "header": (b"L", NOHDRS, NR_HDR),
    "eoh": (b"N", NOEOH, NR_EOH),
    "body": (b"B", NOBODY, NR_BODY),
    "eom": (b"E", 0, 0),
}

VERDICTS = {
    b"a": "accept",
    b"c": "continue",
    b"r": "reject",
    b"t": "tempfail",
    b"d": "discard",
    b"y": "replycode",
    b"s": "skip",
    b"4": "tempfail",
    b"f": "tempfail",
}
MODIFICATIONS = frozenset(b"+-2behimq")


class MilterProtocolError(Exception):
    """The milter broke the protocol; the session treats it as an unusable milter."""


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def cstrings(*values: str | bytes) -> bytes:
    return b"".join(
        (v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v) + b"\0" for v in values
    )


def encode_optneg(
    version: int = VERSION, actions: int = OUR_ACTIONS, protocol: int = OUR_PROTOCOL
) -> bytes:
    return packet(b"O", struct.pack(">III", version, actions, protocol))


def encode_macros(stage: bytes, macros: dict[str, str]) -> bytes:
    items = [v for name, value in macros.items() for v in (name, value)]
    return packet(b"D", stage + cstrings(*items))


def encode_connect(hostname: str, address: str, port: int) -> bytes:
    if address.startswith("unix:") or not address:
        return packet(b"C", cstrings(hostname) + b"U")
    family = b"6" if ":" in address else b"4"
    return packet(b"C", cstrings(hostname) + family + struct.pack(">H", port) + cstrings(address))


@dataclass(frozen=True)
class Packet:
    command: bytes
    data: bytes


class Decoder:
    """Splits a byte stream into packets, however it was cut up on the wire."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def empty(self) -> bool:
        return not self._buffer

    def next_packet(self) -> Packet | None:
        buf = self._buffer
        if len(buf) < 4:
            return None
        (length,) = struct.unpack_from(">I", buf)
        if length == 0:
            raise MilterProtocolError("empty packet")
        if length > self.max_packet:
            raise MilterProtocolError(f"packet of {length} bytes exceeds {self.max_packet}")
        if len(buf) < 4 + length:
            return None
        command, data = bytes(buf[4:5]), bytes(buf[5 : 4 + length])
        del buf[: 4 + length]
        return Packet(command, data)


def _fields(data: bytes, count: int, *, at_least: int | None = None) -> list[str]:
    """``count`` NUL-terminated strings (``at_least`` of them if given, more allowed)."""
    if not data.endswith(b"\0"):
        raise MilterProtocolError("string field is not NUL-terminated")
    parts = data[:-1].split(b"\0")
    if at_least is None and len(parts) != count:
        raise MilterProtocolError(f"expected {count} fields, got {len(parts)}")
    if at_least is not None and len(parts) < at_least:
        raise MilterProtocolError(f"expected at least {at_least} fields, got {len(parts)}")
    return [p.decode("utf-8", "surrogateescape") for p in parts]


@dataclass(frozen=True)
class Modification:
    """One end-of-message change: ``kind`` is add_header, insert_header, change_header,
    change_from, add_rcpt, delete_rcpt, replace_body or quarantine."""

    kind: str
    name: str = ""
    value: str = ""
    index: int = 0
    args: str = ""
    body: bytes = b""


def decode_modification(p: Packet) -> Modification:
    c, d = p.command, p.data
    if c in (b"i", b"m"):
        if len(d) < 4:
            raise MilterProtocolError("header index missing")
        (index,) = struct.unpack_from(">I", d)
        name, value = _fields(d[4:], 2)
        if not name:
            raise MilterProtocolError("empty header name")
        return Modification(
            "insert_header" if c == b"i" else "change_header", name=name, value=value, index=index
        )
    if c == b"h":
        name, value = _fields(d, 2)
        if not name:
            raise MilterProtocolError("empty header name")
        return Modification("add_header", name=name, value=value)
    if c == b"e":
        parts = _fields(d, 1, at_least=1)
        return Modification("change_from", value=parts[0], args=" ".join(parts[1:]))
    if c in (b"+", b"2"):
        parts = _fields(d, 1, at_least=1)
        return Modification("add_rcpt", value=parts[0], args=" ".join(parts[1:]))
    if c == b"-":
        return Modification("delete_rcpt", value=_fields(d, 1)[0])
    if c == b"b":
        return Modification("replace_body", body=d)
    if c == b"q":
        return Modification("quarantine", value=_fields(d, 1, at_least=1)[0])
    raise MilterProtocolError(f"unknown modification {c!r}")


@dataclass(frozen=True)
class Reply:
    """A custom SMTP reply from SMFIR_REPLYCODE: ``550 5.7.1 text``."""

    code: int
    status: str | None
    text: str


def decode_replycode(data: bytes) -> Reply:
    text = _fields(data, 1)[0]
    if (
        len(text) < 3
        or not text[:3].isdigit()
        or text[0] not in "45"
        or (len(text) > 3 and text[3] not in " -")
    ):
        raise MilterProtocolError(f"bad reply code {text[:40]!r}")
    code = int(text[:3])
    rest = text[4:].replace("\r\n", " ").replace("\n", " ").replace("\r", " ").strip()
    status = None
    first, _, tail = rest.partition(" ")
    pieces = first.split(".")
    if len(pieces) == 3 and all(x.isdigit() for x in pieces) and first[0] == text[0]:
        status, rest = first, tail
    return Reply(code, status, rest)


@dataclass(frozen=True)
class Verdict:
    """What the milter answered for a stage (``continue`` when it was not asked)."""

    action: str  # accept, continue, reject, tempfail, discard, replycode, skip
    reply: Reply | None = None
    modifications: tuple[Modification, ...] = ()


CONTINUE = Verdict("continue")


class Progress:
    """SMFIR_PROGRESS: the milter is still working; its timeout restarts."""


PROGRESS = Progress()


@dataclass
class Milter:
    """One milter's side of the conversation as the MTA sees it.

    Call a stage method to get the bytes to send; when :attr:`awaiting` is set,
    feed what the milter sends with :meth:`receive_data` and call
    :meth:`next_event` until it gives a :class:`Verdict` (``None``: more bytes
    needed; :data:`PROGRESS`: keep waiting).
    """

    max_packet: int = MAX_PACKET
    actions: int = 0
    protocol: int = 0
    awaiting: str | None = None
    negotiated: bool = False
    _decoder: Decoder = field(init=False)
    _mods: list[Modification] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._decoder = Decoder(self.max_packet)

    # -- what to send -----------------------------------------------------------

    def optneg(self) -> bytes:
        self.awaiting = "optneg"
        return encode_optneg()

    def wants(self, stage: str) -> bool:
        return not self.protocol & STAGES[stage][1]

    def stage(
        self,
        stage: str,
        data: bytes = b"",
        macros: dict[str, str] | None = None,
        *,
        encoded: bytes | None = None,
    ) -> bytes:
        """The packets for ``stage`` (b"" when the milter asked not to get it)."""
        if not self.negotiated:
            raise MilterProtocolError("stage before negotiation")
        command, skip, no_reply = STAGES[stage]
        if self.protocol & skip:
            self.awaiting = None
            return b""
        out = encode_macros(command, macros) if macros else b""
        out += encoded if encoded is not None else packet(command, data)
        self.awaiting = None if self.protocol & no_reply else stage
        if stage == "eom":
            self._mods = []
        return out

    def abort(self) -> bytes:
        self.awaiting = None
        return packet(b"A")

    def quit(self) -> bytes:
        self.awaiting = None
        return packet(b"Q")

    def quit_nc(self) -> bytes:
        """SMFIC_QUIT_NC: the session is over, another one follows on this connection
        (starting at SMFIC_CONNECT; the negotiated options stay)."""
        self.awaiting = None
        self._mods = []
        return packet(b"K")

    @property
    def idle(self) -> bool:
        """Negotiated, no answer owed and nothing received unread: a clean point to
        end the session on and start another."""
        return self.negotiated and self.awaiting is None and self._decoder.empty

    # -- what comes back ----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)

    def next_event(self) -> Verdict | Progress | None:
        p = self._decoder.next_packet()
        if p is None:
            return None
        stage = self.awaiting
        if stage is None:
            raise MilterProtocolError(f"unexpected packet {p.command!r}")
        if stage == "optneg":
            return self._optneg_reply(p)
        if p.command == b"p":
            return PROGRESS
        if p.command[0] in MODIFICATIONS:
            if stage != "eom":
                raise MilterProtocolError(f"modification {p.command!r} during {stage}")
            mod = decode_modification(p)
            if not self._allowed(mod):
                raise MilterProtocolError(f"{mod.kind} was not negotiated")
            self._mods.append(mod)
            return self.next_event()
        if p.command == b"l":
            return self.next_event()  # SETSYMLIST is for the next stages; we send our set
        action = VERDICTS.get(p.command)
        if action is None:
            raise MilterProtocolError(f"unknown reply {p.command!r}")
        if action == "skip" and stage != "body":
            raise MilterProtocolError(f"skip during {stage}")
        reply = decode_replycode(p.data) if action == "replycode" else None
        self.awaiting = None
        mods = tuple(self._mods) if stage == "eom" else ()
        self._mods = []
        if reply is not None:
            action = "reject" if reply.code >= 500 else "tempfail"
        return Verdict(action, reply, mods)

    def _optneg_reply(self, p: Packet) -> Verdict:
        if p.command != b"O" or len(p.data) < 12:
            raise MilterProtocolError(f"bad option negotiation reply {p.command!r}")
        version, actions, protocol = struct.unpack_from(">III", p.data)
        if version < 2 or version > VERSION:
            raise MilterProtocolError(f"milter protocol version {version} not supported")
        if protocol & ~OUR_PROTOCOL:
            raise MilterProtocolError(
                f"milter asks for protocol steps {protocol:#x} beyond {OUR_PROTOCOL:#x}"
            )
        self.actions = actions & OUR_ACTIONS
        self.protocol = protocol
        self.negotiated = True
        self.awaiting = None
        return CONTINUE

    def _allowed(self, mod: Modification) -> bool:
        need = {
            "add_header": ADDHDRS,
            "insert_header": ADDHDRS,
            "change_header": CHGHDRS,
            "change_from": CHGFROM,
            "add_rcpt": ADDRCPT | ADDRCPT_PAR,
            "delete_rcpt": DELRCPT,
            "replace_body": CHGBODY,
            "quarantine": QUARANTINE,
        }[mod.kind]
        return bool(self.actions & need)


def body_packets(chunks: Iterable[bytes]) -> Iterable[bytes]:
    """Body data cut into SMFIC_BODY packets of at most ``BODY_CHUNK`` bytes."""
    for chunk in chunks:
        for start in range(0, len(chunk), BODY_CHUNK):
            yield packet(b"B", chunk[start : start + BODY_CHUNK])
