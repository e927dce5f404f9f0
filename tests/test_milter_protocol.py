"""The sans-IO milter protocol: framing, encoders/decoders, hostile replies."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mta.milter import protocol as p
from trio_mta.milter.message import MilterMessage, parse_headers

packets = st.lists(
    st.tuples(
        st.sampled_from(list(b"acrtdyhimebp+-l")).map(lambda c: bytes([c])), st.binary(max_size=300)
    ),
    max_size=20,
)


def _decode_all(decoder: p.Decoder) -> list[p.Packet]:
    out = []
    while (packet := decoder.next_packet()) is not None:
        out.append(packet)
    return out


@given(packets, st.lists(st.integers(0, 10_000), max_size=30))
def test_any_split_of_a_reply_stream_decodes_to_the_same_packets(
    items: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    wire = b"".join(p.packet(c, d) for c, d in items)
    decoder = p.Decoder()
    got: list[p.Packet] = []
    last = 0
    for cut in [*sorted(c % (len(wire) + 1) for c in cuts), len(wire)]:
        decoder.feed(wire[last:cut])
        last = cut
        got += _decode_all(decoder)
    assert got == [p.Packet(c, d) for c, d in items]


@given(
    st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s and ":" not in s),
    st.text(max_size=200).filter(lambda s: "\0" not in s),
    st.integers(0, 2**32 - 1),
)
def test_header_modifications_round_trip(name: str, value: str, index: int) -> None:
    encoded = name.encode() + b"\0" + value.encode() + b"\0"
    assert p.decode_modification(p.Packet(b"h", encoded)) == p.Modification(
        "add_header", name=name, value=value
    )
    assert p.decode_modification(
        p.Packet(b"m", struct.pack(">I", index) + encoded)
    ) == p.Modification("change_header", name=name, value=value, index=index)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=10).filter(lambda s: "\0" not in s),
        st.text(max_size=30).filter(lambda s: "\0" not in s),
        max_size=8,
    )
)
def test_macro_packets_round_trip(macros: dict[str, str]) -> None:
    decoder = p.Decoder()
    decoder.feed(p.encode_macros(b"M", macros))
    [packet] = _decode_all(decoder)
    assert packet.command == b"D" and packet.data[:1] == b"M"
    fields = packet.data[1:].split(b"\0")[:-1] if macros else []
    assert dict(zip(fields[::2], fields[1::2], strict=True)) == {
        k.encode(): v.encode() for k, v in macros.items()
    }


@given(st.binary(max_size=2000), st.sampled_from(["mail", "rcpt", "body", "eom", "optneg"]))
def test_hostile_milter_replies_only_ever_raise_the_protocol_error(
    stream: bytes, stage: str
) -> None:
    milter = p.Milter(max_packet=512)
    milter.optneg()
    if stage != "optneg":
        milter.receive_data(p.packet(b"O", struct.pack(">III", 6, 0x1FF, 0)))
        assert milter.next_event() == p.CONTINUE
        milter.stage(stage, b"x")
    milter.receive_data(stream)
    try:
        while (event := milter.next_event()) is not None:
            assert isinstance(event, (p.Verdict, p.Progress))
    except p.MilterProtocolError:
        pass


def _negotiated(protocol: int = 0, actions: int = 0x1FF) -> p.Milter:
    milter = p.Milter()
    milter.optneg()
    milter.receive_data(p.packet(b"O", struct.pack(">III", 6, actions, protocol)))
    assert milter.next_event() == p.CONTINUE
    return milter


def test_oversized_packet_is_refused_before_it_is_buffered() -> None:
    milter = _negotiated()
    milter.stage("mail", b"<a@b>\0")
    milter.receive_data(struct.pack(">I", p.MAX_PACKET + 1) + b"a")
    with pytest.raises(p.MilterProtocolError, match="exceeds"):
        milter.next_event()


def test_replycode_verdict_carries_the_reply_and_its_class() -> None:
    milter = _negotiated()
    milter.stage("rcpt", b"<a@b>\0")
    milter.receive_data(p.packet(b"y", b"451 4.7.1 greylisted\0"))
    verdict = milter.next_event()
    assert verdict == p.Verdict("tempfail", p.Reply(451, "4.7.1", "greylisted"))


@pytest.mark.parametrize("text", [b"250 ok\0", b"55 x\0", b"abc\0", b"550 no-nul"])
def test_replycode_that_is_no_refusal_is_a_protocol_error(text: bytes) -> None:
    milter = _negotiated()
    milter.stage("mail", b"<a@b>\0")
    milter.receive_data(p.packet(b"y", text))
    with pytest.raises(p.MilterProtocolError):
        milter.next_event()


def test_modification_outside_end_of_message_is_a_protocol_error() -> None:
    milter = _negotiated()
    milter.stage("mail", b"<a@b>\0")
    milter.receive_data(p.packet(b"h", b"X\0y\0"))
    with pytest.raises(p.MilterProtocolError, match="during mail"):
        milter.next_event()


def test_modification_not_negotiated_is_a_protocol_error() -> None:
    milter = _negotiated(actions=p.ADDHDRS)
    milter.stage("eom")
    milter.receive_data(p.packet(b"b", b"new body"))
    with pytest.raises(p.MilterProtocolError, match="replace_body"):
        milter.next_event()


def test_skipped_and_silent_stages_expect_no_reply() -> None:
    milter = _negotiated(protocol=p.NOHELO | p.NR_RCPT)
    assert milter.stage("helo", b"x\0") == b""
    assert milter.awaiting is None
    assert milter.stage("rcpt", b"<a@b>\0") != b""
    assert milter.awaiting is None
    milter.stage("eom")
    assert milter.awaiting == "eom"


def test_eom_collects_modifications_until_the_verdict() -> None:
    milter = _negotiated()
    milter.stage("eom")
    milter.receive_data(p.packet(b"p") + p.packet(b"h", b"A\0b\0") + p.packet(b"-", b"<x@y>\0"))
    assert milter.next_event() is p.PROGRESS
    assert milter.next_event() is None
    milter.receive_data(p.packet(b"a"))
    verdict = milter.next_event()
    assert isinstance(verdict, p.Verdict) and verdict.action == "accept"
    assert [m.kind for m in verdict.modifications] == ["add_header", "delete_rcpt"]


def test_only_a_clean_point_may_end_a_session_with_quit_nc() -> None:
    """No answer owed and nothing unread: only then may the connection serve another
    session (milter/pool.py); SMFIC_QUIT_NC keeps the negotiated options."""
    milter = p.Milter()
    assert not milter.idle  # not negotiated yet
    milter = _negotiated(protocol=p.NR_HDR)
    assert milter.idle
    milter.stage("mail", b"<a@b>\0")
    assert not milter.idle  # its verdict is owed
    milter.receive_data(p.packet(b"c"))
    assert isinstance(milter.next_event(), p.Verdict) and milter.idle
    milter.stage("eom")
    milter.receive_data(p.packet(b"h", b"A\0b\0"))
    assert milter.next_event() is None and not milter.idle
    assert milter.quit_nc() == p.packet(b"K")
    assert milter.negotiated and milter.protocol == p.NR_HDR and milter.awaiting is None
    milter.stage("connect", encoded=p.encode_connect("h", "127.0.0.1", 25))
    milter.receive_data(p.packet(b"c"))
    verdict = milter.next_event()
    assert isinstance(verdict, p.Verdict) and verdict.modifications == ()


def test_unknown_protocol_version_is_refused() -> None:
    milter = p.Milter()
    milter.optneg()
    milter.receive_data(p.packet(b"O", struct.pack(">III", 7, 0, 0)))
    with pytest.raises(p.MilterProtocolError, match="version 7"):
        milter.next_event()


def test_folded_headers_are_one_field_and_the_body_starts_after_the_blank_line() -> None:
    data = b"A: 1\r\nB: two\r\n  lines\r\n\r\nbody\r\n"
    headers, start = parse_headers(data)
    assert [(h.name, h.value) for h in headers] == [("A", " 1"), ("B", " two\n  lines")]
    assert data[start:] == b"body\r\n"


def test_message_rebuilt_from_modifications() -> None:
    message = MilterMessage.from_parts(b"R: x\r\n", b"A: 1\r\nA: 2\r\n\r\nbody\r\n", None)
    message.apply(
        (
            p.Modification("change_header", name="a", value="z", index=2),
            p.Modification("insert_header", name="T", value="top", index=0),
            p.Modification("change_header", name="R", value="", index=1),
            p.Modification("add_header", name="N", value="a\nb"),
        )
    )
    assert b"".join(message.chunks()) == (b"T: top\r\nA: 1\r\nA: z\r\nN: a\r\nb\r\n\r\nbody\r\n")


def test_rspamds_protocol_flags_are_accepted() -> None:
    """rspamd 3.4 answers OPTNEG with every NR_* flag, NR_UNKN included (0xff080)."""
    milter = _negotiated(protocol=0xFF080)
    assert milter.stage("helo", b"x\0") != b"" and milter.awaiting is None
    milter.stage("eom")
    assert milter.awaiting == "eom"
