"""The server conversation machine, driven with plain byte strings."""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from trio_mta.smtp import (
    NEED_DATA,
    AuthAttempt,
    BodyChunk,
    ConnectionClosed,
    DataStarted,
    EndOfMessage,
    Event,
    Hello,
    LocalProtocolError,
    MailFrom,
    MailParams,
    MessageRefused,
    Path,
    Quit,
    RcptTo,
    Reply,
    ServerConnection,
    StartTlsRequest,
    TransactionReset,
)
from trio_mta.smtp.data import has_bare_line_ending

from .smtp_helpers import (
    BANNER,
    COMMAND_LINES,
    PASSWORD,
    Decider,
    decide,
    feed,
    make_server,
    pump,
    replies,
    split_at,
    wire_bytes,
)


def talk(
    data: bytes,
    server: ServerConnection | None = None,
    **options: object,
) -> tuple[list[Event], list[bytes]]:
    """Feed ``data`` in one piece (no EOF); return events and final reply lines."""
    server = server or make_server(**options)
    server.data_to_send()
    events, out = feed(server, [data], eof=False)
    return events, replies(out)


def codes(lines: list[bytes]) -> list[bytes]:
    return [line[:9] for line in lines]


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


EHLO = b"EHLO c.test\r\n"
ENVELOPE = EHLO + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n"


# ------------------------------------------------------------------ greeting
def test_banner_comes_first() -> None:
    server = ServerConnection(hostname="mx", max_message_size=100, max_recipients=1, starttls=False)
    server.receive_data(b"EHLO early\r\n")
    with pytest.raises(LocalProtocolError):
        server.next_event()
    server.send_reply(BANNER)
    assert server.next_event() == Hello(True, "early")
    assert server.data_to_send().startswith(b"220 mx.test ESMTP\r\n250-mx\r\n")


def test_421_banner_closes() -> None:
    server = ServerConnection(hostname="mx", max_message_size=100, max_recipients=1, starttls=False)
    server.send_reply(Reply(421, "4.7.0", "Too many connections"))
    assert server.closed
    assert server.next_event() == ConnectionClosed()
    assert server.data_to_send() == b"421 4.7.0 Too many connections\r\n"


def test_554_banner_serves_only_quit() -> None:
    server = ServerConnection(hostname="mx", max_message_size=100, max_recipients=1, starttls=False)
    server.send_reply(Reply(554, "5.7.1", "No service"))
    events, lines = talk(EHLO + b"MAIL FROM:<a@b>\r\nQUIT\r\n", server)
    assert codes(lines) == [b"503 5.5.1", b"503 5.5.1", b"221 2.0.0"]
    assert events == [Quit(), ConnectionClosed()]


# --------------------------------------------------------------------- hello
def test_ehlo_capabilities_before_tls() -> None:
    server = make_server()
    events, _ = talk(EHLO, server)
    assert events == [Hello(True, "c.test")]
    assert server.helo_name == "c.test" and server.esmtp


def ehlo_lines(**options: object) -> list[str]:
    server = make_server(**options)
    server.data_to_send()
    server.receive_data(EHLO)
    pump(server)
    return server.data_to_send().decode().split("\r\n")[:-1]


def test_ehlo_reply_lists_extensions() -> None:
    assert ehlo_lines() == [
        "250-mx.test",
        "250-PIPELINING",
        "250-SIZE 10000",
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250-SMTPUTF8",
        "250-CHUNKING",
        "250-DSN",
        "250 STARTTLS",
    ]
    assert ehlo_lines(tls_active=True)[-1] == "250 AUTH PLAIN LOGIN"
    assert "250-STARTTLS" not in ehlo_lines(tls_active=True)
    assert ehlo_lines(starttls=False)[-1] == "250 DSN"
    assert ehlo_lines(auth_requires_tls=False)[-1] == "250 AUTH PLAIN LOGIN"
    assert ehlo_lines(tls_active=True, auth_mechanisms=())[-1] == "250 DSN"
    assert ehlo_lines(tls_active=True, auth_mechanisms=["login"])[-1] == "250 AUTH LOGIN"


def test_unknown_mechanism_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        make_server(auth_mechanisms=("CRAM-MD5",))


def test_helo() -> None:
    server = make_server()
    events, lines = talk(b"HELO old.test\r\nMAIL FROM:<a@b> SIZE=10\r\nMAIL FROM:<a@b>\r\n", server)
    assert lines == [b"250 mx.test", b"555 5.5.4 ESMTP parameters require EHLO", b"250 2.1.0 Ok"]
    assert events[0] == Hello(False, "old.test") and not server.esmtp


# --------------------------------------------------------------- transaction
def test_complete_transaction() -> None:
    server = make_server()
    events, lines = talk(ENVELOPE + b"DATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n", server)
    assert events == [
        Hello(True, "c.test"),
        MailFrom(Path("a", "b.test"), MailParams()),
        RcptTo(Path("x", "y.test")),
        DataStarted(),
        BodyChunk(b"Subject: x\r\n\r\n.dot\r\n"),
        EndOfMessage(20),
        TransactionReset(),
        Quit(),
        ConnectionClosed(),
    ]
    assert codes(lines) == [
        b"250 START",
        b"250 2.1.0",
        b"250 2.1.5",
        b"354 End d",
        b"250 2.0.0",
        b"221 2.0.0",
    ]
    assert server.closed


def test_decisions_block_reading_ahead() -> None:
    server = make_server()
    server.data_to_send()
    server.receive_data(ENVELOPE + b"NOOP\r\n")
    assert server.next_event() == Hello(True, "c.test")
    assert isinstance(server.next_event(), MailFrom)
    assert server.pending_decision == MailFrom(Path("a", "b.test"), MailParams())
    with pytest.raises(LocalProtocolError):
        server.next_event()
    assert replies(server.data_to_send()) == [b"250 STARTTLS"]  # nothing past MAIL
    server.send_reply(Reply(250, "2.1.0", "Sender ok"))
    assert isinstance(server.next_event(), RcptTo)
    server.send_reply(Reply(550, "5.1.1", "Nobody"))
    assert server.next_event() is NEED_DATA
    assert replies(server.data_to_send()) == [
        b"250 2.1.0 Sender ok",
        b"550 5.1.1 Nobody",
        b"250 2.0.0 Ok",
    ]


def test_send_reply_without_decision_is_misuse() -> None:
    server = make_server()
    with pytest.raises(LocalProtocolError):
        server.send_reply(Reply(250, "2.0.0", "Ok"))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"MAIL FROM:<a@b>\r\n", [b"503 5.5.1 Error: send HELO/EHLO first"]),
        (EHLO + b"RCPT TO:<x@y>\r\n", [b"250 STARTTLS", b"503 5.5.1 Error: need MAIL command"]),
        (EHLO + b"DATA\r\n", [b"250 STARTTLS", b"503 5.5.1 Error: need MAIL command"]),
        (
            EHLO + b"MAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\n",
            [b"250 STARTTLS", b"250 2.1.0 Ok", b"503 5.5.1 Error: nested MAIL command"],
        ),
        (
            EHLO + b"MAIL FROM:<a@b>\r\nDATA\r\n",
            [b"250 STARTTLS", b"250 2.1.0 Ok", b"554 5.5.1 Error: no valid recipients"],
        ),
        (
            EHLO + b"MAIL FROM:<a@b>\r\nRCPT TO:<bad@y>\r\nDATA\r\n",
            [
                b"250 STARTTLS",
                b"250 2.1.0 Ok",
                b"550 5.1.1 No such user",
                b"554 5.5.1 Error: no valid recipients",
            ],
        ),
        (
            EHLO + b"MAIL FROM:<bad@b>\r\nRCPT TO:<x@y>\r\n",
            [b"250 STARTTLS", b"550 5.7.1 Sender refused", b"503 5.5.1 Error: need MAIL command"],
        ),
        (
            EHLO + b"MAIL FROM:<a@b> SIZE=10001\r\n",
            [b"250 STARTTLS", b"552 5.3.4 Message size exceeds fixed maximum message size"],
        ),
        (EHLO + b"MAIL FROM:<a@b> SIZE=10000\r\n", [b"250 STARTTLS", b"250 2.1.0 Ok"]),
        (
            EHLO + b"MAIL FROM:<a@b> BODY=BINARYMIME\r\n",
            [b"250 STARTTLS", b"555 5.5.4 BODY=BINARYMIME not supported"],
        ),
        (
            b"NOOP\r\nVRFY bob\r\nHELP\r\nRSET\r\nFROB\r\nEXPN x\r\n",
            [
                b"250 2.0.0 Ok",
                b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
                b"214 2.0.0 See RFC 5321",
                b"250 2.0.0 Ok",
                b"500 5.5.1 Command unrecognized",
                b"502 5.5.1 Command not implemented",
            ],
        ),
        (b"NOOP\nNOOP\r\n", [b"500 5.5.2 Bare CR or LF in command line", b"250 2.0.0 Ok"]),
        (b"NO\rOP\r\nNOOP\r\n", [b"500 5.5.2 Bare CR or LF in command line", b"250 2.0.0 Ok"]),
        (b"\nNOOP\r\n", [b"500 5.5.2 Bare CR or LF in command line", b"250 2.0.0 Ok"]),
        (b"X" * 600 + b"\r\nNOOP\r\n", [b"500 5.5.2 Line too long", b"250 2.0.0 Ok"]),
    ],
)
def test_machine_answers(data: bytes, expected: list[bytes]) -> None:
    assert talk(data)[1] == expected


def test_recipient_limit() -> None:
    rcpts = b"".join(b"RCPT TO:<r%d@y>\r\n" % i for i in range(7))
    events, lines = talk(EHLO + b"MAIL FROM:<a@b>\r\n" + rcpts, max_recipients=5)
    assert codes(lines[2:]) == [b"250 2.1.5"] * 5 + [b"452 4.5.3"] * 2
    assert sum(isinstance(e, RcptTo) for e in events) == 5


def test_refused_recipients_do_not_count_toward_the_limit() -> None:
    rcpts = b"RCPT TO:<bad@y>\r\n" * 3 + b"RCPT TO:<a@y>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\n"
    _, lines = talk(EHLO + b"MAIL FROM:<a@b>\r\n" + rcpts, max_recipients=2)
    assert codes(lines[2:]) == [b"550 5.1.1"] * 3 + [b"250 2.1.5"] * 2 + [b"452 4.5.3"]


def test_rset_and_new_ehlo_reset_the_transaction() -> None:
    events, lines = talk(
        ENVELOPE + b"RSET\r\nRCPT TO:<x@y>\r\nMAIL FROM:<a@b>\r\nEHLO again\r\nRCPT TO:<x@y>\r\n"
    )
    assert codes(lines[3:]) == [
        b"250 2.0.0",
        b"503 5.5.1",
        b"250 2.1.0",
        b"250 START",
        b"503 5.5.1",
    ]
    assert [type(e).__name__ for e in events[3:]] == [
        "TransactionReset",
        "MailFrom",
        "TransactionReset",
        "Hello",
    ]


def test_unknown_rcpt_parameters_are_refused() -> None:
    assert talk(EHLO + b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y> X-FLAG\r\n")[1][-1] == (
        b"555 5.5.4 Unsupported parameter: X-FLAG"
    )


def test_rcpt_dsn_parameters_need_ehlo() -> None:
    lines = talk(b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y> NOTIFY=NEVER\r\n")[1]
    assert lines[-1] == b"555 5.5.4 ESMTP parameters require EHLO"


def test_utf8_recipient_needs_smtputf8_mail() -> None:
    rcpt = "RCPT TO:<jörg@bücher.example>\r\n".encode()
    lines = talk(
        EHLO + b"MAIL FROM:<a@b>\r\n" + rcpt + b"RSET\r\n" + b"MAIL FROM:<a@b> SMTPUTF8\r\n" + rcpt
    )[1]
    assert codes(lines[2:]) == [b"553 5.6.7", b"250 2.0.0", b"250 2.1.0", b"250 2.1.5"]


def test_too_many_errors_close_with_421() -> None:
    server = make_server(max_errors=3)
    events, lines = talk(b"FROB\r\n" * 5, server)
    assert codes(lines) == [b"500 5.5.1"] * 3 + [b"421 4.7.0"]
    assert events == [ConnectionClosed()]
    assert server.closed


def test_overlong_line_is_not_buffered() -> None:
    server = make_server()
    server.data_to_send()
    for _ in range(100):
        server.receive_data(b"A" * 1000)
        assert server.next_event() is NEED_DATA
        assert len(server._buf) <= 2000
    server.receive_data(b"AAA\r\nNOOP\r\n")
    assert pump(server) == []
    assert replies(server.data_to_send()) == [b"500 5.5.2 Line too long", b"250 2.0.0 Ok"]


def test_eof_closes_and_drops_partial_message() -> None:
    server = make_server()
    events, _ = feed(server, [ENVELOPE + b"DATA\r\npartial"])
    assert [type(e).__name__ for e in events][-3:] == [
        "DataStarted",
        "BodyChunk",
        "ConnectionClosed",
    ]
    assert server.closed
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")


def test_close_queues_a_final_reply() -> None:
    server = make_server()
    server.data_to_send()
    server.receive_data(b"EHLO x\r\nMAIL FROM:<a@b>\r\n")
    pump(server, lambda e: Reply(250, "2.1.0", "Ok"))
    server.close(Reply(421, "4.4.2", "Timeout"))
    assert server.next_event() == ConnectionClosed()
    assert replies(server.data_to_send())[-1] == b"421 4.4.2 Timeout"


def test_421_decision_reply_closes() -> None:
    server = make_server()
    events, lines = feed(
        server,
        [EHLO + b"MAIL FROM:<a@b>\r\nNOOP\r\n"],
        decider=lambda e: Reply(421, "4.3.2", "Shutting down"),
    )
    assert replies(lines)[-1] == b"421 4.3.2 Shutting down"
    assert events[-1] == ConnectionClosed()


# Issue 14: atheris (fuzz/fuzz_data.py, seed fuzz/seeds/data/split-overlong-bare-cr) found
# an over-long line with a bare CR answered "Bare CR or LF" in one piece but "Line too long"
# when a split left more than a line's worth buffered without an LF.
def test_overlong_line_with_bare_cr_gets_the_same_reply_for_any_split() -> None:
    line = b"RCPT TO:<" + b"a" * 20 + b"\r" + b"\x00" * 3 + b"a" * 1100 + b"@y.test>\r\n"
    data = ENVELOPE + line + b"NOOP\r\n"
    expected = [b"500 5.5.2 Line too long", b"250 2.0.0 Ok"]
    for cut in range(len(ENVELOPE), len(data)):
        _, out = feed(make_server(), [data[:cut], data[cut:]])
        assert replies(out)[4:] == expected, cut


@pytest.mark.parametrize(
    "line",
    [
        b"NOOP " + b"x" * 300 + b"\r" + b"x" * 300 + b"\r\n",  # 512 < length <= 1038
        b"NOOP " + b"x" * 600 + b"\n",
        b"MAIL FROM:<" + b"x" * 1200 + b"\rx>\r\n",
        b"RCPT TO:<" + b"x" * 1100 + b"\rx>\r\n",
        b"x" * 2000 + b"\n",
    ],
)
def test_line_length_is_judged_before_line_endings(line: bytes) -> None:
    assert talk(EHLO + line + b"NOOP\r\n")[1][1:] == [b"500 5.5.2 Line too long", b"250 2.0.0 Ok"]


# ---------------------------------------------------------------------- DATA
def test_bare_lf_in_data_refuses_the_message() -> None:
    events, lines = talk(
        ENVELOPE + b"DATA\r\nfirst\n.\nMAIL FROM:<evil@x>\r\n.\r\nRCPT TO:<x@y>\r\n"
    )
    refusal = Reply(550, "5.5.2", "Message refused: bare CR or LF in message data")
    assert MessageRefused(refusal) in events
    assert not any(isinstance(e, EndOfMessage) for e in events)
    assert sum(isinstance(e, MailFrom) for e in events) == 1
    assert lines[-2:] == [refusal.format()[:-2], b"503 5.5.1 Error: need MAIL command"]


def test_too_big_message_is_refused_after_reading_it() -> None:
    big = (b"x" * 998 + b"\r\n") * 20
    events, lines = talk(ENVELOPE + b"DATA\r\n" + big + b".\r\nNOOP\r\n")
    assert codes(lines[-2:]) == [b"552 5.3.4", b"250 2.0.0"]
    body = b"".join(e.data for e in events if isinstance(e, BodyChunk))
    assert len(body) <= 10_000
    assert [type(e).__name__ for e in events][-2:] == ["MessageRefused", "TransactionReset"]


@pytest.mark.parametrize("bdat", [False, True])
def test_too_big_message_passes_the_same_body_prefix_for_any_split(bdat: bool) -> None:
    body = b"".join(b"%05d\r\n" % i for i in range(2000))  # 14 000 octets
    if bdat:
        data = ENVELOPE + b"BDAT %d LAST\r\n" % len(body) + body + b"NOOP\r\n"
    else:
        data = ENVELOPE + b"DATA\r\n" + body + b".\r\nNOOP\r\n"
    for cut in range(len(data) - len(body) - 20, len(data), 997):
        events, _ = feed(make_server(), [data[:cut], data[cut:]])
        passed = b"".join(e.data for e in events if isinstance(e, BodyChunk))
        assert passed == body[:10_000], cut  # exactly max_message_size octets
        assert (
            MessageRefused(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))
            in events
        )


def test_second_transaction_on_the_same_connection() -> None:
    one = b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nbody\r\n.\r\n"
    events, lines = talk(EHLO + one + one)
    assert [e for e in events if isinstance(e, EndOfMessage)] == [EndOfMessage(6)] * 2
    assert codes(lines).count(b"250 2.0.0") == 2


def test_in_data_flag() -> None:
    server = make_server()
    server.receive_data(ENVELOPE + b"DATA\r\nabc")
    assert pump(server)[-2:] == [DataStarted(), BodyChunk(b"abc")]
    assert server.in_data and server.in_transaction
    server.receive_data(b"\r\n.\r\n")
    assert server.next_event() == BodyChunk(b"\r\n")
    assert server.next_event() == EndOfMessage(5)
    assert not server.in_data
    server.send_reply(Reply(250, "2.0.0", "Ok"))
    assert server.next_event() == TransactionReset()
    assert not server.in_transaction


# ---------------------------------------------------------------------- BDAT
def test_bdat_chunks() -> None:
    events, lines = talk(ENVELOPE + b"BDAT 7\r\n.a\r\nb\r\nBDAT 3 LAST\r\nc\r\nNOOP\r\n")
    assert codes(lines[3:]) == [b"250 2.0.0", b"250 2.0.0", b"250 2.0.0"]
    assert lines[3] == b"250 2.0.0 7 octets received"
    assert events[3:] == [
        DataStarted(),
        BodyChunk(b".a\r\nb\r\nc\r\n"),
        EndOfMessage(10),
        TransactionReset(),
    ]


def test_bdat_adds_a_missing_final_crlf() -> None:
    events, _ = talk(ENVELOPE + b"BDAT 3 LAST\r\nabc")
    assert events[-3:] == [BodyChunk(b"abc\r\n"), EndOfMessage(5), TransactionReset()]


def test_bdat_zero_last() -> None:
    events, _ = talk(ENVELOPE + b"BDAT 2\r\nab")
    assert events[-1] == BodyChunk(b"ab")
    events, _lines = talk(ENVELOPE + b"BDAT 0 LAST\r\n")
    assert events[-2:] == [EndOfMessage(0), TransactionReset()]


def test_refused_bdat_still_consumes_its_chunk() -> None:
    events, lines = talk(EHLO + b"BDAT 6\r\nRSET\r\nNOOP\r\n")
    assert lines[1:] == [b"503 5.5.1 Error: need MAIL command", b"250 2.0.0 Ok"]
    assert not any(isinstance(e, TransactionReset) for e in events)


def test_bdat_bare_line_ending_refused_at_last() -> None:
    events, lines = talk(ENVELOPE + b"BDAT 2\r\na\nBDAT 1 LAST\r\nb")
    assert lines[-2:] == [
        b"250 2.0.0 2 octets received",
        b"550 5.5.2 Message refused: bare CR or LF in message data",
    ]
    assert not any(isinstance(e, EndOfMessage) for e in events)


def test_bdat_crlf_across_chunks_is_fine() -> None:
    events, _ = talk(ENVELOPE + b"BDAT 2\r\na\rBDAT 1 LAST\r\n\n")
    assert EndOfMessage(3) in events


def test_bdat_size_limit_across_chunks() -> None:
    chunk = b"y" * 5998 + b"\r\n"
    events, lines = talk(ENVELOPE + b"BDAT 6000\r\n" + chunk + b"BDAT 6000 LAST\r\n" + chunk)
    assert codes(lines[-2:]) == [b"250 2.0.0", b"552 5.3.4"]
    assert sum(len(e.data) for e in events if isinstance(e, BodyChunk)) <= 10_000


def test_data_after_bdat_is_refused() -> None:
    lines = talk(ENVELOPE + b"BDAT 3\r\nabcDATA\r\nRCPT TO:<z@y>\r\n")[1]
    assert lines[-2:] == [b"503 5.5.1 Error: BDAT transfer in progress"] * 2


# ------------------------------------------------------------------ STARTTLS
def starttls_server() -> ServerConnection:
    server = make_server()
    server.data_to_send()
    return server


def test_starttls_discards_pipelined_commands() -> None:
    server = starttls_server()
    server.receive_data(EHLO + b"STARTTLS\r\nRSET\r\nMAIL FROM:<a@b>\r\n")
    assert server.next_event() == Hello(True, "c.test")
    assert server.next_event() == StartTlsRequest()
    server.send_reply(Reply(220, "2.0.0", "Ready to start TLS"))
    assert server.awaiting_tls
    assert server.pending_plaintext == b"RSET\r\nMAIL FROM:<a@b>\r\n"
    assert server.next_event() is NEED_DATA
    assert replies(server.data_to_send())[-1] == b"220 2.0.0 Ready to start TLS"
    server.tls_established()
    assert server.tls_active and server.helo_name is None and not server.esmtp
    _events, lines = talk(b"MAIL FROM:<a@b>\r\nSTARTTLS\r\n" + EHLO, server)
    assert lines[:2] == [
        b"503 5.5.1 Error: send HELO/EHLO first",
        b"503 5.5.1 Error: TLS already active",
    ]
    assert lines[2] == b"250 AUTH PLAIN LOGIN"


def test_refused_starttls_continues_in_plaintext() -> None:
    _events, lines = talk(EHLO + b"STARTTLS\r\nRSET\r\n")
    assert lines[1:] == [b"454 4.7.0 TLS not available", b"250 2.0.0 Ok"]


def test_starttls_not_offered_or_in_transaction() -> None:
    assert talk(b"STARTTLS\r\n", starttls=False)[1] == [b"502 5.5.1 Error: command not implemented"]
    assert talk(ENVELOPE + b"STARTTLS\r\n")[1][-1] == (
        b"503 5.5.1 Error: MAIL transaction in progress"
    )


def test_tls_established_needs_an_accepted_starttls() -> None:
    with pytest.raises(LocalProtocolError):
        make_server().tls_established()


def test_data_received_while_waiting_for_tls_is_discarded() -> None:
    server = starttls_server()
    server.receive_data(b"STARTTLS\r\n")
    assert server.next_event() == StartTlsRequest()
    server.send_reply(Reply(220, "2.0.0", "Go"))
    server.receive_data(b"NOOP\r\n")
    server.tls_established()
    assert server.next_event() is NEED_DATA
    assert server.pending_plaintext == b"NOOP\r\n"
    assert server.data_to_send() == b"220 2.0.0 Go\r\n"


@given(st.binary(max_size=200), st.lists(st.integers(0, 300), max_size=4))
def test_nothing_after_starttls_is_ever_answered(tail: bytes, cuts: list[int]) -> None:
    server = starttls_server()
    server.receive_data(EHLO + b"STARTTLS\r\n" + tail)
    out = b""
    events = pump(
        server, lambda e: Reply(220, "2.0.0", "Go") if isinstance(e, StartTlsRequest) else decide(e)
    )
    out += server.data_to_send()
    assert events == [Hello(True, "c.test"), StartTlsRequest()]
    assert out.endswith(b"250 STARTTLS\r\n220 2.0.0 Go\r\n")
    assert server.pending_plaintext == tail
    server.tls_established()
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == b""


# ---------------------------------------------------------------------- AUTH
def tls_server(**options: object) -> ServerConnection:
    server = make_server(tls_active=True, **options)
    server.data_to_send()
    server.receive_data(EHLO)
    pump(server)
    server.data_to_send()
    return server


def attempts(events: list[Event]) -> list[AuthAttempt]:
    return [e for e in events if isinstance(e, AuthAttempt)]


def test_auth_plain_with_initial_response() -> None:
    server = tls_server()
    events, lines = talk(b"AUTH PLAIN " + b64(f"admin\0bob\0{PASSWORD}") + b"\r\n", server)
    assert attempts(events) == [AuthAttempt("PLAIN", "admin", "bob", PASSWORD)]
    assert lines == [b"235 2.7.0 Authentication successful"]
    assert server.authenticated_user == "bob"
    assert talk(b"AUTH LOGIN\r\n", server)[1] == [b"503 5.5.1 Error: already authenticated"]


def test_auth_plain_with_empty_challenge() -> None:
    server = tls_server()
    events, lines = talk(b"AUTH PLAIN\r\n" + b64("\0bob\0wrong") + b"\r\n", server)
    assert lines == [b"334 ", b"535 5.7.8 Authentication credentials invalid"]
    assert attempts(events) == [AuthAttempt("PLAIN", "", "bob", "wrong")]
    assert server.authenticated_user is None


def test_auth_login() -> None:
    server = tls_server()
    events, lines = talk(b"AUTH LOGIN\r\n" + b64("bob") + b"\r\n" + b64(PASSWORD) + b"\r\n", server)
    assert lines == [
        b"334 VXNlcm5hbWU6",
        b"334 UGFzc3dvcmQ6",
        b"235 2.7.0 Authentication successful",
    ]
    assert attempts(events) == [AuthAttempt("LOGIN", "", "bob", PASSWORD)]


def test_auth_login_with_initial_username() -> None:
    server = tls_server()
    events, lines = talk(b"AUTH LOGIN " + b64("bob") + b"\r\n" + b64("pw") + b"\r\n", server)
    assert lines == [b"334 UGFzc3dvcmQ6", b"535 5.7.8 Authentication credentials invalid"]
    assert attempts(events) == [AuthAttempt("LOGIN", "", "bob", "pw")]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"AUTH LOGIN\r\n*\r\n", [b"334 VXNlcm5hbWU6", b"501 5.0.0 Authentication cancelled"]),
        (
            b"AUTH PLAIN\r\n*\r\nNOOP\r\n",
            [b"334 ", b"501 5.0.0 Authentication cancelled", b"250 2.0.0 Ok"],
        ),
        (b"AUTH PLAIN !!!\r\n", [b"501 5.5.2 Invalid base64 data"]),
        (b"AUTH LOGIN\r\n@@@\r\n", [b"334 VXNlcm5hbWU6", b"501 5.5.2 Invalid base64 data"]),
        (b"AUTH PLAIN " + b64("no-nuls") + b"\r\n", [b"501 5.5.2 Invalid authentication response"]),
        (
            b"AUTH PLAIN " + base64.b64encode(b"\0\xff\0x") + b"\r\n",
            [b"501 5.5.2 Invalid authentication response"],
        ),
        (b"AUTH PLAIN =\r\n", [b"501 5.5.2 Invalid authentication response"]),
        (b"AUTH CRAM-MD5\r\n", [b"504 5.5.4 Unrecognized authentication type"]),
        (
            b"AUTH PLAIN\r\n" + b"A" * 13000 + b"\r\nNOOP\r\n",
            [b"334 ", b"500 5.5.6 Authentication exchange line is too long", b"250 2.0.0 Ok"],
        ),
        (
            b"AUTH PLAIN\r\nabc\nNOOP\r\n",
            [b"334 ", b"500 5.5.2 Bare CR or LF in command line", b"250 2.0.0 Ok"],
        ),
        (
            b"MAIL FROM:<a@b>\r\nAUTH PLAIN\r\n",
            [b"250 2.1.0 Ok", b"503 5.5.1 Error: MAIL transaction in progress"],
        ),
    ],
)
def test_auth_failures(data: bytes, expected: list[bytes]) -> None:
    server = tls_server()
    _events, lines = talk(data, server)
    assert lines == expected
    assert server.authenticated_user is None


def test_auth_preconditions() -> None:
    assert talk(EHLO + b"AUTH PLAIN " + b64("\0a\0b") + b"\r\n")[1][-1] == (
        b"538 5.7.11 Encryption required for requested authentication mechanism"
    )
    assert talk(b"AUTH PLAIN\r\n", tls_active=True)[1] == [b"503 5.5.1 Error: send EHLO first"]
    assert talk(EHLO + b"AUTH PLAIN\r\n", tls_active=True, auth_mechanisms=())[1][-1] == (
        b"502 5.5.1 Error: authentication not enabled"
    )
    assert talk(EHLO + b"AUTH PLAIN\r\n", auth_requires_tls=False)[1][-1] == b"334 "


def test_what_the_session_does_not_offer_is_refused_before_sequence_errors() -> None:
    assert talk(ENVELOPE + b"STARTTLS\r\n", starttls=False)[1][-1] == (
        b"502 5.5.1 Error: command not implemented"
    )
    assert talk(ENVELOPE + b"STARTTLS\r\n", tls_active=True)[1][-1] == (
        b"503 5.5.1 Error: TLS already active"
    )
    assert talk(ENVELOPE + b"AUTH PLAIN\r\n", tls_active=True, auth_mechanisms=())[1][-1] == (
        b"502 5.5.1 Error: authentication not enabled"
    )
    server = tls_server()
    login = b"AUTH PLAIN " + b64(f"\0bob\0{PASSWORD}") + b"\r\n"
    _, lines = talk(login + b"MAIL FROM:<a@b>\r\n" + login + b"RSET\r\nHELO x\r\n" + login, server)
    assert lines == [
        b"235 2.7.0 Authentication successful",
        b"250 2.1.0 Ok",
        b"503 5.5.1 Error: already authenticated",
        b"250 2.0.0 Ok",
        b"250 mx.test",
        b"503 5.5.1 Error: already authenticated",
    ]


def test_sequence_errors_precede_argument_checks() -> None:
    _, lines = talk(
        b"HELO x\r\nMAIL FROM:<a@b>\r\nAUTH PLAIN\r\nMAIL FROM:<a@b> SIZE=1\r\n"
        b"RSET\r\nAUTH PLAIN\r\n",
        tls_active=True,
    )
    assert lines == [
        b"250 mx.test",
        b"250 2.1.0 Ok",
        b"503 5.5.1 Error: MAIL transaction in progress",
        b"503 5.5.1 Error: nested MAIL command",
        b"250 2.0.0 Ok",
        b"503 5.5.1 Error: send EHLO first",
    ]


def test_auth_attempt_repr_hides_the_password() -> None:
    assert PASSWORD not in repr(AuthAttempt("PLAIN", "", "bob", PASSWORD))


def test_starttls_forgets_authentication() -> None:
    server = make_server(auth_requires_tls=False)
    server.data_to_send()
    server.receive_data(EHLO + b"AUTH PLAIN " + b64(f"\0bob\0{PASSWORD}") + b"\r\nSTARTTLS\r\n")
    pump(
        server, lambda e: Reply(220, "2.0.0", "Go") if isinstance(e, StartTlsRequest) else decide(e)
    )
    assert server.authenticated_user == "bob" and server.awaiting_tls
    server.tls_established()
    assert server.authenticated_user is None


# ---------------------------------------------------------------- properties
@given(wire_bytes, st.lists(st.integers(0, 10_000), max_size=8))
def test_any_split_gives_the_same_events_and_output(data: bytes, cuts: list[int]) -> None:
    whole = feed(make_server(max_errors=1000), [data])
    split = feed(make_server(max_errors=1000), split_at(data, cuts))
    assert split == whole


def _line_near_a_limit(
    verb: bytes, size: int, stray: list[tuple[int, bytes]], ending: bytes
) -> bytes:
    line = bytearray(verb + b"a" * max(0, size - len(verb)))
    for where, what in stray:
        line[where % (len(line) + 1) : where % (len(line) + 1)] = what
    return bytes(line) + ending


_LINES_NEAR_LIMITS = st.builds(
    _line_near_a_limit,
    st.sampled_from([b"", b"NOOP ", b"RCPT TO:<", b"MAIL FROM:<", b"AUTH PLAIN "]),
    st.sampled_from(
        [
            505,
            509,
            510,
            511,
            512,
            1010,
            1011,
            1012,
            1013,
            1030,
            1035,
            1036,
            1037,
            1038,
            1039,
            1136,
            1137,
            1138,
            1139,
            1500,
            12287,
            12288,
            12289,
            12290,
            12291,
        ]
    ),
    st.lists(
        st.tuples(st.integers(0, 13_000), st.sampled_from([b"\r", b"\n", b"\x00", b"\r\n"])),
        max_size=3,
    ),
    st.sampled_from([b"\r\n", b"\n", b"\r", b""]),
)
_PREFIXES = st.sampled_from(
    [
        b"",
        EHLO,
        ENVELOPE,
        ENVELOPE + b"DATA\r\n",
        EHLO + b"AUTH PLAIN\r\n",
        ENVELOPE + b"BDAT 2000\r\n",
    ]
)


@given(
    _PREFIXES,
    st.lists(
        st.sampled_from(COMMAND_LINES) | _LINES_NEAR_LIMITS | st.binary(max_size=12), max_size=8
    ).map(b"".join),
    st.lists(st.integers(0, 40_000), max_size=6),
)
def test_no_split_changes_replies_events_or_where_data_ends(
    prefix: bytes, rest: bytes, cuts: list[int]
) -> None:
    data = prefix + rest
    options = {"max_errors": 1000, "auth_requires_tls": False, "max_message_size": 50_000}
    whole = feed(make_server(**options), [data])
    split = feed(make_server(**options), split_at(data, cuts))
    assert split == whole


_REPLIES = st.sampled_from(
    [
        Reply(250, "2.0.0", "Ok"),
        Reply(220, "2.0.0", "Go"),
        Reply(235, "2.7.0", "Ok"),
        Reply(550, "5.0.0", "No"),
        Reply(421, "4.3.2", "Bye"),
        Reply(454, "4.7.0", "No TLS"),
    ]
)


@given(
    wire_bytes | st.binary(max_size=300),
    st.lists(st.integers(0, 10_000), max_size=8),
    st.lists(_REPLIES, min_size=1, max_size=8),
    st.booleans(),
    st.integers(1, 30),
)
def test_no_input_makes_the_server_raise(
    data: bytes, cuts: list[int], answers: list[Reply], tls: bool, max_errors: int
) -> None:
    server = make_server(tls_active=tls, auth_requires_tls=not tls, max_errors=max_errors)
    cycle = itertools.cycle(answers)
    decider: Decider = lambda event: next(cycle)  # noqa: E731
    for chunk in split_at(data, cuts):
        if server.closed:
            break
        if chunk:
            server.receive_data(chunk)
        pump(server, decider, on_tls=True)
        server.data_to_send()
    if not server.closed:
        server.receive_data(b"")
        assert pump(server, decider, on_tls=True)[-1] == ConnectionClosed()
    assert server.closed


_SMUGGLE = st.lists(
    st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"x"]), min_size=1, max_size=8
).map(b"".join)


@given(_SMUGGLE, st.lists(st.integers(0, 500), max_size=5), st.booleans())
def test_smuggling_never_yields_two_messages(smuggle: bytes, cuts: list[int], bdat: bool) -> None:
    first = b"Subject: one\r\n\r\nfirst" + smuggle
    second = (
        b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nx\r\n"
    )
    assume(b"\r\n.\r\n" not in b"\r\n" + first + second)
    if bdat:
        body = first + second + b".\r\n"
        data = ENVELOPE + b"BDAT %d LAST\r\n" % len(body) + body
    else:
        data = ENVELOPE + b"DATA\r\n" + first + second + b".\r\n"
    events, _ = feed(make_server(max_message_size=1_000_000), split_at(data, cuts))
    messages = [e for e in events if isinstance(e, (EndOfMessage, MessageRefused))]
    assert len(messages) == 1
    assert [e.path.local_part for e in events if isinstance(e, MailFrom)] == ["a"]
    assert [e.path.local_part for e in events if isinstance(e, RcptTo)] == ["x"]
    clean = not has_bare_line_ending(first + second)
    assert isinstance(messages[0], EndOfMessage) == clean


@given(st.integers(1, 20), st.booleans(), st.lists(st.integers(0, 100_000), max_size=10))
def test_pipelined_transactions(count: int, quit_: bool, cuts: list[int]) -> None:
    one = (
        b"MAIL FROM:<a@b.test> SIZE=100\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<bad@y.test>\r\n"
        b"RCPT TO:<z@y.test>\r\nDATA\r\n"
    )
    body = b"Subject: p\r\n\r\n..line\r\n"
    data = EHLO + (one + body + b".\r\n") * count + (b"QUIT\r\n" if quit_ else b"")
    events, out = feed(make_server(), split_at(data, cuts))
    assert events.count(EndOfMessage(len(body) - 1)) == count
    assert codes(replies(out)).count(b"354 End d") == count
    assert codes(replies(out)).count(b"550 5.1.1") == count
    assert (Quit() in events) == quit_
