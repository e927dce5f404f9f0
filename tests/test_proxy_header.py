"""The sans-IO PROXY protocol parser: round trips, split invariance, malformed input."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from trio_mta.proxy import (
    MAX_V1_LENGTH,
    NEED_DATA,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    format_v1,
    format_v2,
    parse_header,
)

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


@st.composite
def tcp_headers(draw: st.DrawFn, version: int) -> ProxyHeader:
    family = draw(st.sampled_from(["TCP4", "TCP6"]))
    addresses = ipv4 if family == "TCP4" else ipv6
    tlvs: tuple[tuple[int, bytes], ...] = ()
    if version == 2:
        tlvs = tuple(
            draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4))
        )
    return ProxyHeader(
        version,
        "PROXY",
        family,  # type: ignore[arg-type]
        (draw(addresses), draw(ports)),
        (draw(addresses), draw(ports)),
        tlvs,
    )


def v2_headers() -> st.SearchStrategy[ProxyHeader]:
    return st.one_of(
        tcp_headers(2),
        st.just(ProxyHeader(2, "LOCAL", "UNKNOWN")),
        st.just(ProxyHeader(2, "PROXY", "UNKNOWN")),
        st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20)), max_size=3).map(
            lambda tlvs: ProxyHeader(2, "PROXY", "UNIX", tlvs=tuple(tlvs))
        ),
    )


def v1_headers() -> st.SearchStrategy[ProxyHeader]:
    return st.one_of(tcp_headers(1), st.just(ProxyHeader(1, "PROXY", "UNKNOWN")))


def _formatted(header: ProxyHeader) -> bytes:
    return format_v1(header) if header.version == 1 else format_v2(header)


def _feed_in_pieces(data: bytes, cuts: list[int]) -> object:
    """What a reader fed ``data`` split at ``cuts`` decides: a header, NEED_DATA or the
    error class; plus the trailing bytes."""
    reader = ProxyHeaderReader()
    start = 0
    try:
        for cut in [*sorted(cuts), len(data)]:
            reader.receive_data(data[start:cut])
            start = cut
            event = reader.next_event()
            if event is not NEED_DATA:
                reader.receive_data(data[start:])
                return event, reader.trailing_data
        return NEED_DATA
    except ProxyHeaderError:
        return ProxyHeaderError


@given(st.one_of(v1_headers(), v2_headers()), st.binary(max_size=30))
def test_formatted_headers_parse_back_to_the_same_header(header: ProxyHeader, rest: bytes) -> None:
    data = _formatted(header)
    assert parse_header(data + rest) == (header, len(data))


@given(st.one_of(v1_headers(), v2_headers()), st.binary(max_size=30), st.data())
def test_any_split_of_a_header_gives_the_same_header_and_trailing_bytes(
    header: ProxyHeader, rest: bytes, data: st.DataObject
) -> None:
    raw = _formatted(header) + rest
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=8))
    assert _feed_in_pieces(raw, cuts) == (header, rest)


@given(st.one_of(v1_headers(), v2_headers()), st.data())
def test_every_truncated_header_needs_more_data(header: ProxyHeader, data: st.DataObject) -> None:
    raw = _formatted(header)
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert parse_header(raw[:cut]) is NEED_DATA


@given(st.binary(max_size=300), st.data())
@example(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", None)
@example(V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes(11), None)
def test_arbitrary_bytes_never_crash_and_do_not_depend_on_the_split(
    raw: bytes, data: st.DataObject | None
) -> None:
    """Only ProxyHeaderError, and the same outcome however the bytes arrive."""
    try:
        whole: object = parse_header(raw)
    except ProxyHeaderError:
        whole = ProxyHeaderError
    if whole is not NEED_DATA and whole is not ProxyHeaderError:
        header, used = whole  # type: ignore[misc]
        whole = header, raw[used:]
    cuts = [] if data is None else data.draw(st.lists(st.integers(0, len(raw)), max_size=6))
    assert _feed_in_pieces(raw, cuts) == whole


@given(st.one_of(v1_headers(), v2_headers()), st.data())
def test_corrupting_one_byte_never_crashes(header: ProxyHeader, data: st.DataObject) -> None:
    raw = bytearray(_formatted(header))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] = data.draw(st.integers(0, 255))
    try:
        result = parse_header(bytes(raw))
    except ProxyHeaderError:
        return
    if result is not NEED_DATA:
        assert result[1] <= len(raw)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"EHLO client.example\r\n", "not a PROXY protocol header"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "4 fields"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "4 fields"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "bad address"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "bad address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n", "0x0a"),
        (b"PROXY " + b"A" * (MAX_V1_LENGTH - 6), "longer than 107"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version nibble 1"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "neither LOCAL nor PROXY"),
        (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "datagram"),
        (V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "not defined"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0b", "cannot hold"),
        (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "cannot hold"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(14), "inside a TLV"),
        (V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x04\x00\x09\x00", "overruns"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason):
        parse_header(raw)


def test_the_spec_worst_case_v1_header_of_107_bytes_is_accepted() -> None:
    address = str(ipaddress.IPv6Address("ffff:" * 7 + "ffff"))
    raw = f"PROXY UNKNOWN {address} {address} 65535 65535\r\n".encode()
    assert len(raw) == MAX_V1_LENGTH
    assert parse_header(raw) == (ProxyHeader(1, "PROXY", "UNKNOWN"), MAX_V1_LENGTH)
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parse_header(raw[:-2] + b"5\r\n")


def test_v1_unknown_ignores_what_follows_and_names_no_client() -> None:
    result = parse_header(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nEHLO")
    assert result == (ProxyHeader(1, "PROXY", "UNKNOWN"), 35)
    assert result[0].client is None  # type: ignore[index]


def test_v2_local_ignores_its_addresses() -> None:
    raw = V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12)
    assert parse_header(raw) == (ProxyHeader(2, "LOCAL", "UNKNOWN"), 28)


def test_a_hostile_v2_length_waits_for_bytes_but_never_reads_past_them() -> None:
    raw = V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(100)
    assert parse_header(raw) is NEED_DATA
