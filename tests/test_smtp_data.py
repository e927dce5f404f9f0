"""DATA framing: dot-stuffing on the way out, unstuffing and the end marker on the way in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mta.smtp import DataReader, LocalProtocolError, dot_stuff
from trio_mta.smtp.data import BdatReader, LineEndingChecker, has_bare_line_ending

from .smtp_helpers import split_at


def read(
    wire: bytes,
    cuts: list[int] | None = None,
    max_size: int = 10**9,
) -> tuple[bytes, bytes | None, DataReader]:
    """Feed ``wire`` split at ``cuts``; return (body, remainder, reader)."""
    reader = DataReader(max_size)
    body = []
    chunks = split_at(wire, cuts or [])
    for i, chunk in enumerate(chunks):
        out, rest = reader.feed(chunk)
        body.append(out)
        if rest is not None:
            return b"".join(body), rest + b"".join(chunks[i + 1 :]), reader
    return b"".join(body), None, reader


def normalise(body: bytes) -> bytes:
    """What a body looks like on the wire: CRLF line ends, a final CRLF."""
    body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return body if not body or body.endswith(b"\r\n") else body + b"\r\n"


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"", b".\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".a\r\n.\r\n..\r\n", b"..a\r\n..\r\n...\r\n.\r\n"),
        (b"a\nb\rc\r\n", b"a\r\nb\r\nc\r\n.\r\n"),
        (b"x\n.\n", b"x\r\n..\r\n.\r\n"),
        (b"\r\r\n", b"\r\n\r\n.\r\n"),
    ],
)
def test_dot_stuff(body: bytes, wire: bytes) -> None:
    assert dot_stuff(body) == wire


def test_read_simple_message_and_remainder() -> None:
    body, rest, reader = read(b"Subject: x\r\n\r\n..dot\r\nend\r\n.\r\nQUIT\r\n")
    assert body == b"Subject: x\r\n\r\n.dot\r\nend\r\n"
    assert rest == b"QUIT\r\n"
    assert reader.done and reader.size == len(body) and not reader.bad_line_ending


def test_dot_first_is_an_empty_message() -> None:
    body, rest, reader = read(b".\r\nNOOP\r\n")
    assert (body, rest, reader.size) == (b"", b"NOOP\r\n", 0)


def test_dot_line_with_text_loses_its_dot() -> None:
    # RFC 5321 §4.5.2: a line starting with a dot has it removed, stuffed or not.
    assert read(b".abc\r\n.\r\n")[0] == b"abc\r\n"


@pytest.mark.parametrize(
    "smuggle",
    [
        b"\n.\r\n",
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\n.\r",
        b"\r.\r\n",
        b"\r.\n",
    ],
)
def test_smuggling_sequences_never_end_the_data(smuggle: bytes) -> None:
    second = b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nevil\r\n"
    body, rest, reader = read(b"first" + smuggle + second + b".\r\nNEXT")
    assert rest == b"NEXT"
    assert reader.bad_line_ending
    assert second in body  # the "commands" were message text


def test_bare_line_endings_are_flagged_anywhere() -> None:
    assert read(b"a\nb\r\n.\r\n")[2].bad_line_ending
    assert read(b"a\rb\r\n.\r\n")[2].bad_line_ending
    assert read(b"ab\r\r\n.\r\n")[2].bad_line_ending
    assert not read(b"a\r\nb\r\n.\r\n")[2].bad_line_ending


def test_too_big_is_discarded_but_read_to_the_end() -> None:
    line = b"x" * 98 + b"\r\n"
    wire = line * 50 + b".\r\nQUIT\r\n"
    reader = DataReader(1000)
    emitted = 0
    rest = None
    for i in range(0, len(wire), 300):
        out, rest = reader.feed(wire[i : i + 300])
        emitted += len(out)
        if rest is not None:
            break
    assert reader.too_big and reader.done
    assert reader.size == 5000 and emitted == 1000
    assert rest is not None and rest.startswith(b"QUIT")


def test_feed_after_end_is_misuse() -> None:
    reader = DataReader(100)
    reader.feed(b".\r\n")
    with pytest.raises(LocalProtocolError):
        reader.feed(b"x")


def test_has_bare_line_ending() -> None:
    assert not has_bare_line_ending(b"")
    assert not has_bare_line_ending(b"a\r\nb\r\n")
    for bad in (b"\n", b"\r", b"a\n", b"\ra", b"\r\r\n", b"\r\n\n", b"a\rb\nc"):
        assert has_bare_line_ending(bad), bad


@pytest.mark.parametrize(
    ("chunks", "bad", "crlf_end"),
    [
        ([b"a\r", b"\nb\r\n"], False, True),
        ([b"a\r", b"b"], True, False),
        ([b"a", b"\n"], True, False),
        ([b"a\r"], True, False),
        ([b"a\r\n", b""], False, True),
        ([], False, True),
        ([b"abc"], False, False),
    ],
)
def test_line_ending_checker_across_chunks(chunks: list[bytes], bad: bool, crlf_end: bool) -> None:
    checker = LineEndingChecker()
    for chunk in chunks:
        checker.feed(chunk)
    checker.finish()
    assert (checker.bad, checker.ends_with_crlf) == (bad, crlf_end)


# ---------------------------------------------------------------- properties
_PIECES = st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"line", b"\x00", b"\xff"])
bodies = st.lists(_PIECES, max_size=40).map(b"".join) | st.binary(max_size=200)
cuts = st.lists(st.integers(0, 10_000), max_size=6)


@given(bodies, cuts)
def test_stuffed_body_reads_back_normalised(body: bytes, points: list[int]) -> None:
    wire = dot_stuff(body)
    got, rest, reader = read(wire + b"AFTER", points)
    assert got == normalise(body)
    assert rest == b"AFTER"
    assert not reader.bad_line_ending
    assert reader.size == len(got)


@given(bodies, cuts, st.sampled_from([0, 1, 5, 40, 10**9]))
def test_any_split_gives_the_same_result(data: bytes, points: list[int], max_size: int) -> None:
    whole_body, whole_rest, whole = read(data, max_size=max_size)
    body, rest, reader = read(data, points, max_size=max_size)
    assert (body, rest) == (whole_body, whole_rest)
    assert (reader.bad_line_ending, reader.size, reader.done, reader.too_big) == (
        whole.bad_line_ending,
        whole.size,
        whole.done,
        whole.too_big,
    )
    assert len(body) == min(whole.size, max_size)  # the first max_size octets pass


@given(bodies)
def test_reader_matches_the_rfc_definition(data: bytes) -> None:
    """Reference: the stream preceded by CRLF ends at the first CRLF.CRLF."""
    stream = b"\r\n" + data
    end = stream.find(b"\r\n.\r\n")
    stuffed = stream if end < 0 else stream[: end + 2]
    body, rest, reader = read(data)
    crlf = stuffed.count(b"\r\n")
    bad = crlf != stuffed.count(b"\r") or crlf != stuffed.count(b"\n")
    if end < 0:
        # Unfinished: a trailing CR may still get its LF, so only "bad" is final.
        assert rest is None and not reader.done
        assert not reader.bad_line_ending or bad
    else:
        assert reader.bad_line_ending == bad
        assert body == stuffed.replace(b"\r\n.", b"\r\n")[2:]
        assert rest == stream[end + 5 :]


@given(st.lists(_PIECES, max_size=30).map(b"".join), cuts)
def test_line_ending_checker_agrees_with_whole_buffer_check(data: bytes, points: list[int]) -> None:
    checker = LineEndingChecker()
    for chunk in split_at(data, points):
        checker.feed(chunk)
    checker.finish()
    assert checker.bad == has_bare_line_ending(data)
    assert checker.ends_with_crlf == (not data or data.endswith(b"\r\n"))


# ---------------------------------------------------------------------- BDAT
def read_bdat(
    chunks: list[tuple[bytes, bool]],
    cuts: list[int],
    max_size: int = 10**9,
    trailer: bytes = b"NEXT",
) -> tuple[bytes, list[bytes], BdatReader]:
    """Each chunk followed by ``trailer`` (the next command) in one buffer, split at ``cuts``.

    Returns the body, what was left after each chunk, and the reader.
    """
    reader = BdatReader(max_size)
    body, after = [], []
    for data, last in chunks:
        reader.begin_chunk(len(data), last)
        left = b""
        for piece in split_at(data + trailer, cuts):
            out, pos = reader.feed(piece)
            body.append(out)
            left += piece[pos:]
        assert reader.chunk_done
        after.append(left)
    return b"".join(body), after, reader


def test_bdat_reader_takes_exactly_the_chunk() -> None:
    body, after, reader = read_bdat([(b"ab\r", False), (b"\nc", True)], [1, 3])
    assert (body, after) == (b"ab\r\nc", [b"NEXT", b"NEXT"])
    assert reader.finish() == b"\r\n"
    assert (reader.size, reader.bad_line_ending, reader.too_big) == (7, False, False)


def test_bdat_reader_feed_starts_at_the_offset_and_copies_nothing_whole() -> None:
    reader = BdatReader(100)
    reader.begin_chunk(3, True)
    buf = b"BDAT 3 LAST\r\nxyzQUIT\r\n"
    assert reader.feed(buf, 13) == (b"xyz", 16)
    whole = b"0123456789"
    reader = BdatReader(100)
    reader.begin_chunk(10, True)
    assert reader.feed(whole)[0] is whole


def test_bdat_reader_flags_and_limits() -> None:
    _, _, reader = read_bdat([(b"a\rb", True)], [])
    assert reader.finish() == b"" and reader.bad_line_ending
    _, _, reader = read_bdat([(b"ab\r", True)], [])
    assert reader.finish() == b"" and reader.bad_line_ending  # a CR at the very end
    body, _, reader = read_bdat([(b"x" * 8, False), (b"y" * 8, True)], [3], max_size=10)
    assert body == b"x" * 8 + b"yy" and reader.too_big and reader.size == 16
    assert reader.finish() == b""


def test_bdat_reader_misuse() -> None:
    reader = BdatReader(10)
    reader.begin_chunk(2, False)
    with pytest.raises(LocalProtocolError):
        reader.begin_chunk(1, True)  # the first chunk is not done
    with pytest.raises(LocalProtocolError):
        reader.finish()
    reader.feed(b"ab")
    reader.begin_chunk(0, True)
    assert reader.finish() == b"\r\n"
    with pytest.raises(LocalProtocolError):
        reader.begin_chunk(1, True)


@given(
    st.lists(st.tuples(st.binary(max_size=40), st.booleans()), min_size=1, max_size=5),
    st.lists(st.integers(0, 60), max_size=5),
    st.integers(0, 120),
)
def test_bdat_reader_any_split_gives_the_same_result(
    chunks: list[tuple[bytes, bool]], cuts: list[int], max_size: int
) -> None:
    chunks[-1] = (chunks[-1][0], True)
    chunks = [(data, False) for data, _ in chunks[:-1]] + chunks[-1:]
    whole = read_bdat(chunks, [], max_size)
    split = read_bdat(chunks, cuts, max_size)
    content = b"".join(data for data, _ in chunks)
    assert split[:2] == whole[:2]
    tails = whole[2].finish(), split[2].finish()
    assert tails[0] == tails[1]
    for reader in (whole[2], split[2]):
        assert reader.bad_line_ending == has_bare_line_ending(content)
        assert reader.too_big == (len(content) > max_size)
    assert whole[0] == content[:max_size]
