"""The client conversation machine, against the server machine in memory and scripted servers."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mta.smtp import (
    NEED_DATA,
    AuthAttempt,
    AuthResult,
    BodyChunk,
    ClientConnection,
    ClientEvent,
    CommandResult,
    EndOfMessage,
    Event,
    Greeting,
    HelloResult,
    LocalProtocolError,
    MailFrom,
    Path,
    RcptTo,
    Reply,
    ReplyError,
    ServerConnection,
    SMTPProtocolError,
    StartTlsRequest,
    StartTlsResult,
    TransactionResult,
)

from .smtp_helpers import PASSWORD, converse, decide, make_server, pump

MESSAGE = b"Subject: hello\n\n.leading dot\nbody\n"
WIRE_BODY = b"Subject: hello\r\n\r\n.leading dot\r\nbody\r\n"


def connected(
    server: ServerConnection, *, pipelining: bool = True, chunk: int = 1 << 20
) -> ClientConnection:
    client = ClientConnection(helo_name="client.test")
    assert isinstance(converse(client, server, chunk=chunk), Greeting)
    client.ehlo()
    hello = converse(client, server, chunk=chunk)
    assert isinstance(hello, HelloResult) and hello.esmtp
    if not pipelining:
        del client.extensions["PIPELINING"]
    return client


def scripted(*server_lines: bytes) -> ClientConnection:
    """A client that already got ``server_lines`` (greeting first)."""
    client = ClientConnection(helo_name="client.test")
    client.receive_data(b"".join(server_lines))
    return client


def run(client: ClientConnection) -> ClientEvent:
    event = client.next_event()
    assert event is not NEED_DATA
    return event


def bodies(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, BodyChunk))


# ----------------------------------------------------------- greeting, EHLO
def test_greeting_and_capabilities() -> None:
    server = make_server(max_message_size=5000)
    client = ClientConnection(helo_name="client.test")
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == b""
    greeting = converse(client, server)
    assert greeting == Greeting(Reply(220, None, "mx.test ESMTP"))
    client.ehlo()
    hello = converse(client, server)
    assert isinstance(hello, HelloResult) and hello.esmtp and client.esmtp
    assert client.pipelining and client.starttls and client.smtputf8
    assert client.eightbitmime and client.chunking
    assert client.max_size == 5000
    assert client.auth_mechanisms == frozenset()


def test_refused_greeting_is_reported() -> None:
    client = scripted(b"554 5.7.1 go away\r\n")
    assert run(client) == Greeting(Reply(554, "5.7.1", "go away"))


def test_helo_fallback() -> None:
    client = scripted(b"220 old.example\r\n")
    run(client)
    client.ehlo()
    assert client.data_to_send() == b"EHLO client.test\r\n"
    client.receive_data(b"500 5.5.1 What?\r\n")
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == b"HELO client.test\r\n"
    client.receive_data(b"250 old.example\r\n")
    assert run(client) == HelloResult(Reply(250, None, "old.example"), False)
    assert not client.esmtp and client.extensions == {}


def test_ehlo_temporary_failure_is_not_retried_as_helo() -> None:
    client = scripted(b"220 x\r\n")
    run(client)
    client.ehlo()
    client.data_to_send()
    client.receive_data(b"421 4.3.2 busy\r\n")
    assert run(client) == HelloResult(Reply(421, "4.3.2", "busy"), False)
    assert client.closed
    with pytest.raises(LocalProtocolError):
        client.noop()


def test_extension_parsing() -> None:
    client = scripted(b"220 x\r\n")
    run(client)
    client.ehlo()
    client.receive_data(
        b"250-x greets you\r\n250-AUTH=LOGIN\r\n250-auth plain cram-md5\r\n"
        b"250-SIZE 0\r\n250-X-Thing  a  b \r\n250 8bitmime\r\n"
    )
    run(client)
    assert client.auth_mechanisms == {"LOGIN", "PLAIN", "CRAM-MD5"}
    assert client.max_size is None  # SIZE 0: no fixed limit (RFC 1870)
    assert client.extensions["X-THING"] == "a  b"
    assert client.eightbitmime and not client.pipelining


def test_extension_keyword_ends_at_any_white_space() -> None:
    # Found by fuzz/fuzz_replies.py: "X\tY" used to be one keyword with a tab in it.
    client = scripted(b"220 x\r\n")
    run(client)
    client.ehlo()
    client.receive_data(b"250-x\r\n250-SIZE\t1000\r\n250-AUTH\tPLAIN  LOGIN\r\n250 X\tY  Z\r\n")
    run(client)
    assert client.max_size == 1000
    assert client.auth_mechanisms == {"PLAIN", "LOGIN"}
    assert client.extensions["X"] == "Y  Z"
    assert all(key.split() == [key] for key in client.extensions)


# --------------------------------------------------------------- transactions
@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("chunk", [1 << 20, 7])
def test_transaction_with_some_recipients_refused(pipelining: bool, chunk: int) -> None:
    server = make_server()
    client = connected(server, pipelining=pipelining, chunk=chunk)
    client.send_mail("a@b.test", ["x@y.test", "bad@y.test", Path("z", "y.test")], MESSAGE)
    events: list[Event] = []
    result = converse(client, server, chunk=chunk, events=events)
    assert isinstance(result, TransactionResult)
    ok, refused = Reply(250, "2.0.0", "Ok: queued as Q1"), Reply(550, "5.1.1", "No such user")
    assert result.outcomes == (ok, refused, ok)
    assert result.mail_reply == Reply(250, "2.1.0", "Ok")
    assert bodies(events) == WIRE_BODY
    assert [str(e.path) for e in events if isinstance(e, RcptTo)] == [
        "x@y.test",
        "bad@y.test",
        "z@y.test",
    ]
    mail = next(e for e in events if isinstance(e, MailFrom))
    assert mail.params.size == len(WIRE_BODY) + 1  # one stuffed dot
    assert mail.params.body is None and not mail.params.smtputf8


def test_pipelining_sends_one_write_then_the_body() -> None:
    server = make_server()
    client = connected(server)
    client.send_mail("a@b.test", ["x@y.test", "z@y.test"], b"hi\r\n")
    assert client.data_to_send() == (
        b"MAIL FROM:<a@b.test> SIZE=4\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n"
    )
    server.receive_data(
        b"MAIL FROM:<a@b.test> SIZE=4\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n"
    )
    pump(server)
    client.receive_data(server.data_to_send())
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == b"hi\r\n.\r\n"


@pytest.mark.parametrize("pipelining", [True, False])
def test_every_recipient_refused(pipelining: bool) -> None:
    server = make_server()
    client = connected(server, pipelining=pipelining)
    client.send_mail("a@b.test", ["bad1@y.test", "bad2@y.test"], MESSAGE)
    events: list[Event] = []
    result = converse(client, server, events=events)
    assert isinstance(result, TransactionResult)
    assert [r.code for r in result.outcomes] == [550, 550]
    assert not any(isinstance(e, EndOfMessage) for e in events)
    # The server still holds the envelope: the next transaction starts with RSET.
    client.send_mail("a@b.test", ["x@y.test"], MESSAGE)
    sent = client.data_to_send()
    size = len(WIRE_BODY) + 1  # the stuffed dot counts
    expected = b"RSET\r\nMAIL FROM:<a@b.test> SIZE=%d\r\nRCPT TO:<x@y.test>\r\nDATA\r\n" % size
    assert sent == (expected if pipelining else b"RSET\r\n")
    server.receive_data(sent)
    pump(server)
    result = converse(client, server)
    assert isinstance(result, TransactionResult)
    assert [r.code for r in result.outcomes] == [250]


@pytest.mark.parametrize("pipelining", [True, False])
def test_sender_refused(pipelining: bool) -> None:
    server = make_server()
    client = connected(server, pipelining=pipelining)
    client.send_mail("bad@b.test", ["x@y.test", "z@y.test"], MESSAGE)
    result = converse(client, server)
    assert isinstance(result, TransactionResult)
    refusal = Reply(550, "5.7.1", "Sender refused")
    assert result.outcomes == (refusal, refusal)
    if not pipelining:
        assert result.rcpt_replies == (None, None) and result.data_reply is None


def test_null_sender_and_two_transactions() -> None:
    server = make_server()
    client = connected(server)
    for sender in ("", "a@b.test"):
        client.send_mail(sender, ["x@y.test"], MESSAGE)
        result = converse(client, server)
        assert isinstance(result, TransactionResult)
        assert result.outcomes[0].code == 250
    client.quit()
    assert converse(client, server) == CommandResult(Reply(221, "2.0.0", "Bye"))
    assert client.closed


def test_rset_and_noop_steps() -> None:
    server = make_server()
    client = connected(server)
    client.rset()
    assert converse(client, server) == CommandResult(Reply(250, "2.0.0", "Ok"))
    client.noop()
    assert converse(client, server) == CommandResult(Reply(250, "2.0.0", "Ok"))


def test_smtputf8_and_8bitmime_parameters() -> None:
    server = make_server()
    client = connected(server)
    client.send_mail("jörg@bücher.example", ["x@y.test"], "Subject: é\r\n\r\n".encode())
    events: list[Event] = []
    result = converse(client, server, events=events)
    assert isinstance(result, TransactionResult) and result.outcomes[0].code == 250
    mail = next(e for e in events if isinstance(e, MailFrom))
    assert mail.path == Path("jörg", "bücher.example")
    assert mail.params.smtputf8 and mail.params.body == "8BITMIME"


def test_local_refusals_send_nothing() -> None:
    server = make_server(max_message_size=100)
    client = connected(server)
    del client.extensions["SMTPUTF8"]
    client.send_mail("jörg@x.test", ["a@y.test"], b"hi")
    result = run(client)
    assert isinstance(result, TransactionResult)
    assert (result.mail_reply.code, result.mail_reply.status) == (553, "5.6.7")
    client.send_mail("a@x.test", ["b@y.test"], b"x" * 200)
    result = run(client)
    assert isinstance(result, TransactionResult)
    assert (result.outcomes[0].code, result.outcomes[0].status) == (552, "5.3.4")
    assert client.data_to_send() == b""


def test_data_accepted_without_recipients_gets_an_empty_message() -> None:
    client = scripted(b"220 x\r\n")
    run(client)
    client.ehlo()
    client.receive_data(b"250-x\r\n250 PIPELINING\r\n")
    run(client)
    client.data_to_send()
    client.send_mail("a@b", ["c@d"], b"secret\r\n")
    client.receive_data(b"250 ok\r\n550 no\r\n354 go\r\n")
    assert client.next_event() is NEED_DATA
    assert client.data_to_send().endswith(b".\r\n")
    client.data_to_send()
    client.receive_data(b"554 no valid recipients\r\n")
    result = run(client)
    assert isinstance(result, TransactionResult)
    assert result.data_reply is None and result.outcomes[0].code == 550


def test_421_in_a_pipeline_answers_everything_still_expected() -> None:
    client = scripted(b"220 x\r\n")
    run(client)
    client.ehlo()
    client.receive_data(b"250-x\r\n250 PIPELINING\r\n")
    run(client)
    client.send_mail("a@b", ["c@d", "e@f"], b"hi\r\n")
    client.receive_data(b"421 4.3.2 shutting down\r\n")
    result = run(client)
    assert isinstance(result, TransactionResult)
    assert [r.code for r in result.outcomes] == [421, 421]
    assert client.closed


def test_eof_and_garbage_raise_reply_error() -> None:
    client = ClientConnection(helo_name="c")
    client.receive_data(b"")
    with pytest.raises(ReplyError):
        client.next_event()
    client = scripted(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(ReplyError):
        client.next_event()


def test_misuse_is_refused() -> None:
    client = ClientConnection(helo_name="c")
    with pytest.raises(LocalProtocolError):
        client.ehlo()  # the greeting step is still running
    client.receive_data(b"220 x\r\n")
    run(client)
    with pytest.raises(LocalProtocolError):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        client.send_mail("a@b", [], b"")
    with pytest.raises(LocalProtocolError):
        client.send_mail("a@b", ["c@d>\r\nRCPT TO:<e@f"], b"")
    with pytest.raises(LocalProtocolError):
        client.send_mail("postmaster", ["c@d"], b"")
    with pytest.raises(LocalProtocolError):
        client.authenticate("CRAM-MD5", "u", "p")
    with pytest.raises(LocalProtocolError):
        client.tls_established()


# ---------------------------------------------------------------- STARTTLS
def test_starttls_discards_injected_replies_and_ehlos_again() -> None:
    client = scripted(b"220 x\r\n")
    run(client)
    client.ehlo()
    client.receive_data(b"250-x\r\n250-STARTTLS\r\n250 PIPELINING\r\n")
    run(client)
    client.data_to_send()
    client.start_tls()
    assert client.data_to_send() == b"STARTTLS\r\n"
    client.receive_data(b"220 2.0.0 go\r\n250 2.1.0 injected\r\n")
    assert run(client) == StartTlsResult(Reply(220, "2.0.0", "go"))
    with pytest.raises(LocalProtocolError):
        client.noop()  # the stream must be wrapped first
    client.tls_established()
    assert client.discarded_plaintext == b"250 2.1.0 injected\r\n"
    assert client.tls_active and client.extensions == {}
    assert client.data_to_send() == b"EHLO client.test\r\n"
    client.receive_data(b"250-x\r\n250 AUTH PLAIN\r\n")
    assert isinstance(run(client), HelloResult)
    assert client.auth_mechanisms == {"PLAIN"} and not client.starttls


def test_starttls_against_the_server_machine() -> None:
    server = make_server()
    client = connected(server)
    client.start_tls()
    result = converse(
        client,
        server,
        decider=lambda e: (
            Reply(220, "2.0.0", "Go") if isinstance(e, StartTlsRequest) else decide(e)
        ),
    )
    assert result == StartTlsResult(Reply(220, "2.0.0", "Go"))
    assert server.awaiting_tls
    server.tls_established()
    client.tls_established()
    hello = converse(client, server)
    assert isinstance(hello, HelloResult) and client.auth_mechanisms == {"PLAIN", "LOGIN"}


# ---------------------------------------------------------------------- AUTH
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "plain"])
@pytest.mark.parametrize("password", [PASSWORD, "wrong"])
def test_auth_against_the_server_machine(mechanism: str, password: str) -> None:
    server = make_server(tls_active=True)
    client = connected(server)
    client.authenticate(mechanism, "bob", password)
    events: list[Event] = []
    result = converse(client, server, events=events)
    assert isinstance(result, AuthResult)
    assert result.reply.code == (235 if password == PASSWORD else 535)
    assert [e for e in events if isinstance(e, AuthAttempt)] == [
        AuthAttempt(mechanism.upper(), "", "bob", password)
    ]
    assert server.authenticated_user == ("bob" if password == PASSWORD else None)


def test_long_plain_response_goes_after_the_challenge() -> None:
    server = make_server(tls_active=True)
    client = connected(server)
    long_password = "p" * 600
    client.authenticate("PLAIN", "bob", long_password, authzid="admin")
    assert client.data_to_send() == b"AUTH PLAIN\r\n"
    server.receive_data(b"AUTH PLAIN\r\n")
    pump(server)
    client.receive_data(server.data_to_send())
    assert client.next_event() is NEED_DATA
    token = base64.b64encode(f"admin\0bob\0{long_password}".encode())
    assert client.data_to_send() == token + b"\r\n"


def test_server_asking_for_more_gets_a_cancel() -> None:
    client = scripted(b"220 x\r\n")
    run(client)
    client.authenticate("PLAIN", "u", "p")
    client.data_to_send()
    client.receive_data(b"334 more?\r\n")
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == b"*\r\n"
    client.receive_data(b"501 5.0.0 cancelled\r\n")
    assert run(client) == AuthResult(Reply(501, "5.0.0", "cancelled"))


# ---------------------------------------------------------------- properties
_RECIPIENTS = st.lists(
    st.sampled_from(["x@y.test", "bad@y.test", "z@q.test", "bad2@q.test"]), min_size=1, max_size=6
)


@given(_RECIPIENTS, st.binary(max_size=3000), st.booleans(), st.integers(1, 5000))
def test_client_and_server_agree(
    recipients: list[str], body: bytes, pipelining: bool, chunk: int
) -> None:
    server = make_server(max_message_size=100_000, max_recipients=4)
    client = connected(server, pipelining=pipelining, chunk=chunk)
    client.send_mail("a@b.test", recipients, body)
    events: list[Event] = []
    result = converse(client, server, chunk=chunk, events=events)
    assert isinstance(result, TransactionResult)
    expected = []
    accepted = 0
    for rcpt in recipients:
        if accepted >= 4:
            expected.append(452)
        elif rcpt.startswith("bad"):
            expected.append(550)
        else:
            accepted += 1
            expected.append(250)
    assert [r.code for r in result.outcomes] == expected
    if accepted:
        normal = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if normal and not normal.endswith(b"\r\n"):
            normal += b"\r\n"
        assert bodies(events) == normal
        assert EndOfMessage(len(normal)) in events


@given(st.binary(max_size=400), st.sampled_from(["ehlo", "mail", "auth", "tls", "quit"]))
def test_arbitrary_server_bytes_raise_only_protocol_errors(data: bytes, step: str) -> None:
    client = ClientConnection(helo_name="c")
    client.receive_data(b"220 hi\r\n")
    run(client)
    if step == "ehlo":
        client.ehlo()
    elif step == "mail":
        client.send_mail("a@b", ["c@d", "e@f"], b"x")
    elif step == "auth":
        client.authenticate("LOGIN", "u", "p")
    elif step == "tls":
        client.start_tls()
    else:
        client.quit()
    client.receive_data(data)
    client.receive_data(b"")
    with contextlib.suppress(SMTPProtocolError):
        while client.next_event() is NEED_DATA:
            pass
