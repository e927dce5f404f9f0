"""The client machine's LMTP mode (RFC 2033), byte for byte against scripted replies."""

from __future__ import annotations

import pytest

from trio_mta.smtp import NEED_DATA, ClientConnection, HelloResult, ReplyError, TransactionResult

LHLO_REPLY = b"250-lmtp.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"


def lmtp_session() -> ClientConnection:
    client = ClientConnection(helo_name="mta.test", lmtp=True)
    client.receive_data(b"220 lmtp.test LMTP ready\r\n")
    assert client.next_event() is not NEED_DATA
    client.ehlo()
    assert client.data_to_send() == b"LHLO mta.test\r\n"
    client.receive_data(LHLO_REPLY)
    hello = client.next_event()
    assert isinstance(hello, HelloResult) and hello.esmtp and client.pipelining
    return client


def test_lhlo_refused_is_not_retried_as_helo() -> None:
    client = ClientConnection(helo_name="mta.test", lmtp=True)
    client.receive_data(b"220 lmtp.test\r\n")
    client.next_event()
    client.ehlo()
    assert client.data_to_send() == b"LHLO mta.test\r\n"
    client.receive_data(b"500 5.5.1 what\r\n")
    hello = client.next_event()
    assert isinstance(hello, HelloResult) and not hello.esmtp and hello.reply.code == 500
    assert client.data_to_send() == b""


def test_one_reply_per_accepted_recipient_after_the_data() -> None:
    client = lmtp_session()
    client.send_mail(
        "a@b.test", ["ok@l.test", "gone@l.test", "full@l.test", "ok2@l.test"], b"Subject: x\n\nhi\n"
    )
    assert client.data_to_send() == (
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<ok@l.test>\r\nRCPT TO:<gone@l.test>\r\n"
        b"RCPT TO:<full@l.test>\r\nRCPT TO:<ok2@l.test>\r\nDATA\r\n"
    )
    client.receive_data(
        b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 5.1.1 <gone@l.test> User doesn't"
        b" exist\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n354 go\r\n"
    )
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == b"Subject: x\r\n\r\nhi\r\n.\r\n"
    # Three accepted recipients: three replies, the second one arriving in two pieces.
    client.receive_data(b"250 2.0.0 <ok@l.test> Saved\r\n452 4.2.2 <full@l.test> Quo")
    assert client.next_event() is NEED_DATA
    client.receive_data(b"ta exceeded\r\n")
    assert client.next_event() is NEED_DATA
    client.receive_data(b"250 2.0.0 <ok2@l.test> Saved\r\n")
    result = client.next_event()
    assert isinstance(result, TransactionResult)
    assert [r.code for r in result.outcomes] == [250, 550, 452, 250]
    assert [r and r.code for r in result.data_replies] == [250, None, 452, 250]
    assert result.outcomes[2].status == "4.2.2"
    # The transaction ended: the next one starts without RSET.
    client.send_mail("a@b.test", ["ok@l.test"], b"x\r\n")
    assert client.data_to_send().startswith(b"MAIL FROM:<a@b.test>")


def test_missing_per_recipient_reply_at_eof_is_an_error() -> None:
    client = lmtp_session()
    client.send_mail("a@b.test", ["x@l.test", "y@l.test"], b"x\r\n")
    client.data_to_send()
    client.receive_data(b"250 OK\r\n250 OK\r\n250 OK\r\n354 go\r\n")
    assert client.next_event() is NEED_DATA
    client.data_to_send()
    client.receive_data(b"250 2.0.0 saved\r\n")
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    with pytest.raises(ReplyError):
        client.next_event()


def test_421_after_the_data_answers_the_remaining_recipients() -> None:
    client = lmtp_session()
    client.send_mail("a@b.test", ["x@l.test", "y@l.test"], b"x\r\n")
    client.data_to_send()
    client.receive_data(b"250 OK\r\n250 OK\r\n250 OK\r\n354 go\r\n")
    client.next_event()
    client.data_to_send()
    client.receive_data(b"250 2.0.0 saved\r\n421 4.3.2 shutting down\r\n")
    result = client.next_event()
    assert isinstance(result, TransactionResult)
    assert [r.code for r in result.outcomes] == [250, 421]
    assert client.closed


def test_smtp_mode_still_reads_one_reply_after_the_data() -> None:
    client = ClientConnection(helo_name="mta.test")
    client.receive_data(b"220 mx.test\r\n")
    client.next_event()
    client.ehlo()
    assert client.data_to_send() == b"EHLO mta.test\r\n"
    client.receive_data(b"250-mx.test\r\n250 PIPELINING\r\n")
    client.next_event()
    client.send_mail("a@b.test", ["x@l.test", "y@l.test"], b"x\r\n")
    client.data_to_send()
    client.receive_data(b"250 OK\r\n250 OK\r\n250 OK\r\n354 go\r\n")
    client.next_event()
    client.data_to_send()
    client.receive_data(b"250 queued\r\n")
    result = client.next_event()
    assert isinstance(result, TransactionResult) and result.data_replies == ()
    assert [r.code for r in result.outcomes] == [250, 250]
