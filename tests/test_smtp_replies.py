"""Reply values, their wire form, and the tolerant-but-bounded client-side parser."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mta.smtp import Reply, ReplyError, ReplyParser
from trio_mta.smtp.replies import MAX_REPLY_LINE


def parse_all(data: bytes) -> list[Reply]:
    parser = ReplyParser()
    parser.feed(data)
    out = []
    while (reply := parser.next_reply()) is not None:
        out.append(reply)
    return out


def test_str_lines_are_normalised_to_a_tuple() -> None:
    assert Reply(250, "2.1.0", "Ok") == Reply(250, "2.1.0", ("Ok",))
    assert Reply(250, "2.1.0", "Ok").lines == ("Ok",)


def test_format_repeats_status_on_every_line() -> None:
    assert Reply(250, "2.0.0", ("a", "b")).format() == b"250-2.0.0 a\r\n250 2.0.0 b\r\n"
    assert Reply(550, "5.1.1", "No such user").format() == b"550 5.1.1 No such user\r\n"


def test_format_without_status_or_text() -> None:
    assert Reply(354, None, "Go ahead").format() == b"354 Go ahead\r\n"
    assert Reply(334, None, "").format() == b"334 \r\n"
    assert Reply(250, "2.0.0").format() == b"250 2.0.0\r\n"
    assert Reply(250, None, ("mx", "PIPELINING")).format() == b"250-mx\r\n250 PIPELINING\r\n"


def test_str_and_text() -> None:
    reply = Reply(550, "5.1.1", ("No such", "user"))
    assert str(reply) == "550 5.1.1 No such user"
    assert reply.text == "No such user"
    assert str(Reply(354, None, "Go")) == "354 Go"


@pytest.mark.parametrize(
    ("code", "success", "positive", "intermediate", "transient", "permanent"),
    [
        (200, True, True, False, False, False),
        (250, True, True, False, False, False),
        (299, True, True, False, False, False),
        (354, False, True, True, False, False),
        (421, False, False, False, True, False),
        (554, False, False, False, False, True),
    ],
)
def test_classes(
    code: int, success: bool, positive: bool, intermediate: bool, transient: bool, permanent: bool
) -> None:
    reply = Reply(code, None, "x")
    assert (
        reply.is_success,
        reply.is_positive,
        reply.is_intermediate,
        reply.is_transient,
        reply.is_permanent,
    ) == (success, positive, intermediate, transient, permanent)


@pytest.mark.parametrize(
    ("code", "status", "lines"),
    [
        (199, None, "x"),
        (600, None, "x"),
        (250, "2.0", "x"),
        (250, "3.0.0", "x"),
        (250, None, "a\r\nb"),
        (250, None, ("ok", "inject\n250 x")),
    ],
)
def test_invalid_replies_are_refused_at_construction(
    code: int, status: str | None, lines: str | tuple[str, ...]
) -> None:
    with pytest.raises(ValueError):
        Reply(code, status, lines)


def test_parse_multiline_with_status() -> None:
    [reply] = parse_all(b"250-2.0.0 first\r\n250 2.0.0 second\r\n")
    assert reply == Reply(250, "2.0.0", ("first", "second"))


def test_parse_odd_but_legal_servers() -> None:
    assert parse_all(b"250\r\n") == [Reply(250, None, ("",))]
    assert parse_all(b"250 \r\n") == [Reply(250, None, ("",))]
    # status on some lines only; LF-only line ends
    [reply] = parse_all(b"250-mx.example\n250-PIPELINING\n250 2.0.0 done\n")
    assert reply == Reply(250, "2.0.0", ("mx.example", "PIPELINING", "done"))
    # a status whose class does not match the code is text, not a status
    assert parse_all(b"250 5.0.0 odd\r\n") == [Reply(250, None, ("5.0.0 odd",))]


def test_parse_several_replies_incrementally() -> None:
    parser = ReplyParser()
    data = b"220 hi\r\n250-a\r\n250 b\r\n354 go\r\n"
    got = []
    for byte in data:
        parser.feed(bytes([byte]))
        while (reply := parser.next_reply()) is not None:
            got.append(reply)
    assert [r.code for r in got] == [220, 250, 354]
    assert parser.buffered == b""


@pytest.mark.parametrize(
    "garbage",
    [
        b"hello\r\n",
        b"25\r\n",
        b"2500 x\r\n",
        b"250x\r\n",
        b"099 x\r\n",
        b"250-a\r\n550 b\r\n",
        b"250 a\rb\r\n",
        b"abc 250\r\n",
    ],
)
def test_garbage_raises_reply_error(garbage: bytes) -> None:
    with pytest.raises(ReplyError):
        parse_all(garbage)


def test_endless_line_is_refused() -> None:
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * MAX_REPLY_LINE)
    with pytest.raises(ReplyError):
        parser.next_reply()


def test_endless_multiline_reply_is_refused() -> None:
    with pytest.raises(ReplyError):
        parse_all(b"250-x\r\n" * 2000)


def test_clear_drops_buffered_bytes() -> None:
    parser = ReplyParser()
    parser.feed(b"220 go\r\n250 injected\r\n")
    assert parser.next_reply() == Reply(220, None, "go")
    assert parser.clear() == b"250 injected\r\n"
    assert parser.next_reply() is None


_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)


@given(st.integers(200, 599), st.booleans(), st.lists(_TEXT, min_size=1, max_size=5))
def test_format_then_parse_round_trips(code: int, with_status: bool, lines: list[str]) -> None:
    status = f"{code // 100}.1.2" if with_status and code // 100 != 3 else None
    if status is None:
        # Without a status, a text that looks like one would be read as one.
        lines = [f"t{line}" for line in lines]
    reply = Reply(code, status, tuple(lines))
    assert parse_all(reply.format()) == [reply]


@given(st.binary(max_size=300))
def test_parser_raises_only_reply_error(data: bytes) -> None:
    with contextlib.suppress(ReplyError):
        parse_all(data)
