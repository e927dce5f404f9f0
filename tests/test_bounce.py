"""Bounces (RFC 3464 DSNs): parsed back with the stdlib and checked field by field."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from email.message import EmailMessage, Message
from typing import Any

import pytest

from trio_mta.delivery.outcome import Outcome
from trio_mta.queue.bouncer import failed_recipient
from trio_mta.queue.dsn import MAX_HEADERS, FailedRecipient, build_bounce, needs_bounce
from trio_mta.queue.store import FailedRecord

NOW = 1_700_003_600.0
ARRIVAL = 1_700_000_000.0
ATTEMPT = 1_700_003_000.0
ORIGINAL = (
    b"Received: from client.example.test (client.example.test [192.0.2.1])\r\n"
    b"\tby mx.example.test (trio_mta) with ESMTPS id 0123456789AB-XYZ1\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig-1@example.test>\r\n"
    b"\r\n"
    b"SECRET BODY LINE one\r\n"
    b"SECRET BODY LINE two\r\n"
)
UNKNOWN = FailedRecipient(
    address="bob@remote.test",
    original="Bob@Remote.test",
    status="5.1.1",
    diagnostic="550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown",
    remote_mta="mx.remote.test",
    last_attempt=ATTEMPT,
    smtp_reply=True,
)
FULL = FailedRecipient(
    address="carol@other.test",
    original=None,
    status="5.2.2",
    diagnostic="552-5.2.2 mailbox full\r\n552 5.2.2 try again much later",
    remote_mta="mx1.other.test",
    last_attempt=ATTEMPT + 10,
    smtp_reply=True,
)
NULL_MX = FailedRecipient(
    address="dave@null.test",
    original="dave@null.test",
    status="5.1.10",
    diagnostic=None,
    remote_mta=None,
    last_attempt=None,
)


def bounce(**overrides: Any) -> bytes:
    args: dict[str, Any] = dict(
        reporting_mta="mx.example.test",
        sender="alice@example.test",
        queue_id="0123456789AB-XYZ1",
        arrival=ARRIVAL,
        recipients=[UNKNOWN],
        original=ORIGINAL,
        now=NOW,
    )
    args.update(overrides)
    data = build_bounce(**args)
    assert isinstance(data, bytes)
    assert_wire_format(data)
    return data


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    for part in msg.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    return msg


def assert_wire_format(data: bytes) -> None:
    """RFC 5322 §2.1.1 / RFC 5321 §2.3.8: CRLF only, lines of at most 998 octets."""
    assert data.endswith(b"\r\n")
    assert re.search(rb"(?<!\r)\n", data) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", data) is None, "bare CR"
    assert b"\0" not in data
    for line in data.split(b"\r\n"):
        assert len(line) <= 998, line[:60]


def messages(payload: object) -> list[Message]:
    assert isinstance(payload, list)
    found = [item for item in payload if isinstance(item, Message)]
    assert len(found) == len(payload)
    return found


def parts(msg: EmailMessage) -> list[Message]:
    return messages(msg.get_payload())


def returned_message(msg: EmailMessage) -> Message:
    """The original inside the message/rfc822 part."""
    returned = parts(msg)[2]
    assert returned.get_content_type() == "message/rfc822"
    (inner,) = messages(returned.get_payload())
    return inner


def status_blocks(msg: EmailMessage) -> list[Message]:
    """The per-message block, then one block per recipient (RFC 3464 §2.1)."""
    report = parts(msg)[1]
    assert report.get_content_type() == "message/delivery-status"
    return messages(report.get_payload())


def timestamp(value: object) -> float:
    return email.utils.parsedate_to_datetime(str(value)).timestamp()


def unfolded(value: object) -> str:
    return " ".join(str(value).split())


def text_of(part: Message) -> str:
    raw = part.get_payload(decode=True)
    assert isinstance(raw, bytes)
    return raw.decode("utf-8")


def test_top_level_headers_and_structure() -> None:
    data = bounce()
    msg = parse(data)
    assert data.startswith(b"From: MAILER-DAEMON@mx.example.test (Mail Delivery System)\r\n")
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.test"
    assert msg["To"].addresses[0].addr_spec == "alice@example.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert timestamp(msg["Date"]) == NOW
    assert re.fullmatch(
        r"<bounce-0123456789AB-XYZ1\.[0-9a-f]+@mx\.example\.test>", msg["Message-ID"]
    )
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    # All ASCII: nothing claims 8bit.
    assert "Content-Transfer-Encoding" not in msg
    assert [p["Content-Transfer-Encoding"] for p in parts(msg)] == ["7bit", None, "7bit"]


def test_message_ids_are_unique() -> None:
    assert parse(bounce())["Message-ID"] != parse(bounce())["Message-ID"]


def test_per_message_fields() -> None:
    per_message = status_blocks(parse(bounce()))[0]
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert per_message["X-Queue-ID"] == "0123456789AB-XYZ1"
    assert timestamp(per_message["Arrival-Date"]) == ARRIVAL
    assert "Final-Recipient" not in per_message


def test_several_recipients_each_get_a_field_block() -> None:
    blocks = status_blocks(parse(bounce(recipients=[UNKNOWN, FULL, NULL_MX])))
    assert len(blocks) == 4
    unknown, full, null_mx = blocks[1:]

    assert unknown["Final-Recipient"] == "rfc822; bob@remote.test"
    assert unknown["Original-Recipient"] == "rfc822; Bob@Remote.test"
    assert unknown["Action"] == "failed"
    assert unknown["Status"] == "5.1.1"
    assert unknown["Remote-MTA"] == "dns; mx.remote.test"
    assert unfolded(unknown["Diagnostic-Code"]) == (
        "smtp; 550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown"
    )
    assert timestamp(unknown["Last-Attempt-Date"]) == ATTEMPT

    assert full["Final-Recipient"] == "rfc822; carol@other.test"
    assert "Original-Recipient" not in full
    assert full["Status"] == "5.2.2"
    assert full["Remote-MTA"] == "dns; mx1.other.test"
    # A multi-line reply is joined into one field value.
    assert unfolded(full["Diagnostic-Code"]) == (
        "smtp; 552-5.2.2 mailbox full 552 5.2.2 try again much later"
    )
    assert timestamp(full["Last-Attempt-Date"]) == ATTEMPT + 10

    # Original equal to final, and no remote facts: only what is known.
    assert null_mx["Final-Recipient"] == "rfc822; dave@null.test"
    assert null_mx["Action"] == "failed"
    assert null_mx["Status"] == "5.1.10"
    for absent in ("Original-Recipient", "Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"):
        assert absent not in null_mx


def test_human_part_explains_each_recipient() -> None:
    msg = parse(bounce(recipients=[UNKNOWN, FULL, NULL_MX]))
    notice = parts(msg)[0]
    assert notice.get_content_type() == "text/plain"
    text = " ".join(text_of(notice).split())
    assert text.startswith(
        "This is the mail system at host mx.example.test. I'm sorry to have "
        "to inform you that your message could not be delivered to one or "
        "more recipients."
    )
    assert (
        "<bob@remote.test> (expanded from <Bob@Remote.test>): host mx.remote.test said: "
        "550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown"
    ) in text
    assert "<carol@other.test>: host mx1.other.test said: 552-5.2.2 mailbox full" in text
    assert "<dave@null.test>: recipient domain does not accept mail (null MX)" in text
    assert "expanded from <dave@null.test>" not in text
    assert all(len(line) <= 80 for line in text_of(notice).splitlines())


def test_headers_mode_returns_header_section_without_body() -> None:
    data = bounce()
    assert b"SECRET BODY" not in data
    returned = parts(parse(data))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    raw = returned.get_payload(decode=True)
    assert isinstance(raw, bytes)
    assert raw == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    headers = email.message_from_bytes(raw, policy=email.policy.default)
    assert headers["Subject"] == "quarterly numbers"
    assert headers["Message-ID"] == "<orig-1@example.test>"


def test_full_mode_returns_whole_message() -> None:
    msg = parse(bounce(return_full_message=True))
    original = returned_message(msg)
    assert original["Subject"] == "quarterly numbers"
    assert original.get_payload() == "SECRET BODY LINE one\r\nSECRET BODY LINE two\r\n"
    assert "It's attached below." in " ".join(text_of(parts(msg)[0]).split())
    assert "cut to its first" not in text_of(parts(msg)[0])


def test_full_mode_truncates_large_originals_at_a_line_end() -> None:
    body = b"".join(b"line %05d of a long body\r\n" % n for n in range(2000))
    original = b"Subject: big\r\n\r\n" + body
    data = bounce(original=original, return_full_message=True, max_original=1000)
    msg = parse(data)
    returned = data.split(b"Content-Type: message/rfc822\r\n")[1].split(b"\r\n--=_bounce_")[0]
    embedded = returned.split(b"\r\n\r\n", 1)[1]
    assert embedded.startswith(b"Subject: big\r\n\r\nline 00000")
    assert len(embedded) <= 1000
    assert embedded.endswith(b" of a long body\r\n")
    assert b"line 01999" not in data
    assert "cut to its first 1000 octets" in " ".join(text_of(parts(msg)[0]).split())


def test_null_sender_never_gets_a_bounce() -> None:
    assert needs_bounce("") is False
    assert needs_bounce("alice@example.test") is True
    with pytest.raises(ValueError, match="null sender"):
        build_bounce(
            reporting_mta="mx.example.test",
            sender="",
            queue_id="Q",
            arrival=ARRIVAL,
            recipients=[UNKNOWN],
            original=ORIGINAL,
        )


def test_line_ends_are_normalized_to_crlf() -> None:
    original = b"Subject: mixed\nX-A: 1\rX-B: 2\r\n\nbody\nmore\rend\0\n"
    data = bounce(original=original, return_full_message=True)  # asserts CRLF-only
    inner = returned_message(parse(data))
    assert inner["X-A"] == "1" and inner["X-B"] == "2"
    assert inner.get_payload() == "body\r\nmore\r\nend\r\n"


def test_long_diagnostic_is_folded_under_998_octets() -> None:
    words = " ".join(f"word{n}" for n in range(600))
    diagnostic = f"550 5.7.1 {words}"
    rcpt = FailedRecipient(
        "bob@remote.test", None, "5.7.1", diagnostic, "mx.remote.test", None, smtp_reply=True
    )
    data = bounce(recipients=[rcpt])  # asserts every line <= 998
    block = status_blocks(parse(data))[1]
    assert unfolded(block["Diagnostic-Code"]) == f"smtp; {diagnostic}"
    report = data.split(b"Content-Type: message/delivery-status\r\n")[1].split(b"\r\n--")[0]
    assert max(len(line) for line in report.split(b"\r\n")) <= 78


def test_unbreakable_diagnostic_is_split_not_dropped() -> None:
    token = "x" * 2500
    rcpt = FailedRecipient(
        "bob@remote.test", None, "5.0.0", f"550 {token}", None, None, smtp_reply=True
    )
    block = status_blocks(parse(bounce(recipients=[rcpt])))[1]
    assert "".join(str(block["Diagnostic-Code"]).split()) == f"smtp;550{token}"


def test_overlong_original_header_line_is_folded_without_splitting_utf8() -> None:
    value = "é" * 1500  # 3000 octets on one line
    original = f"Subject: {value}\r\nX-Other: yes\r\n\r\nbody\r\n".encode()
    data = bounce(original=original)
    raw = parts(parse(data))[2].get_payload(decode=True)
    assert isinstance(raw, bytes)
    text = raw.decode("utf-8")  # would raise if a sequence had been cut
    headers = email.message_from_string(text, policy=email.policy.default)
    assert "".join(str(headers["Subject"]).split()) == value
    assert headers["X-Other"] == "yes"


def test_original_without_header_body_separator() -> None:
    only_headers = b"Subject: no body at all\r\nFrom: a@example.test\r\n"
    raw = parts(parse(bounce(original=only_headers)))[2].get_payload(decode=True)
    assert raw == only_headers

    # No empty line, body text straight after the fields: the header section
    # ends at the first line that is not a field.
    run_on = b"Subject: run on\r\nX-Tag: 1\r\n continued\r\nhello there, no blank line\r\nbye\r\n"
    data = bounce(original=run_on)
    assert b"hello there" not in data
    raw = parts(parse(data))[2].get_payload(decode=True)
    assert raw == b"Subject: run on\r\nX-Tag: 1\r\n continued\r\n"

    inner = returned_message(parse(bounce(original=run_on, return_full_message=True)))
    assert inner["Subject"] == "run on"
    assert not inner.defects
    assert inner.get_payload() == "hello there, no blank line\r\nbye\r\n"


def test_empty_original() -> None:
    raw = parts(parse(bounce(original=b"")))[2].get_payload(decode=True)
    assert raw == b""


def test_non_ascii_original_headers_survive_byte_for_byte() -> None:
    subject = "Grüße aus Köln — 東京"
    head = (f"From: Jürgen <j@example.test>\r\nSubject: {subject}\r\n").encode()
    latin1 = b"X-Legacy: caf\xe9\r\n"  # not UTF-8 at all; still returned as sent
    data = bounce(original=head + latin1 + b"\r\nbody\r\n")
    assert head + latin1 in data
    msg = parse(data)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    returned = parts(msg)[2]
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert returned.get_payload(decode=True) == head + latin1
    headers = email.message_from_bytes(head, policy=email.policy.default)
    assert headers["Subject"] == subject
    # The report itself stays 7-bit (RFC 3464 §2.1).
    report = data.split(b"Content-Type: message/delivery-status\r\n")[1].split(b"\r\n--")[0]
    assert report.isascii()


def test_internationalized_addresses_keep_the_report_7bit() -> None:
    rcpt = FailedRecipient(
        "jürgen+x@münchen.test",
        "Jürgen@münchen.test",
        "5.1.1",
        "550 5.1.1 unknown \u00fcser",
        "mx.münchen.test",
        None,
        smtp_reply=True,
    )
    data = bounce(recipients=[rcpt], sender="ana@españa.test")
    msg = parse(data)
    # RFC 6532 §3.2: raw UTF-8 in the header (the stdlib parser cannot decode
    # it in address fields, so look at the bytes).
    assert "\r\nTo: ana@españa.test\r\n".encode() in data
    block = status_blocks(msg)[1]
    # RFC 6533 §3 utf-8-addr-xtext: non-ASCII and "+" as \x{HEX}.
    assert block["Final-Recipient"] == r"utf-8; j\x{FC}rgen\x{2B}x@m\x{FC}nchen.test"
    assert block["Original-Recipient"] == r"utf-8; J\x{FC}rgen@m\x{FC}nchen.test"
    assert block["Remote-MTA"] == "dns; mx.xn--mnchen-3ya.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 unknown ?ser"
    notice = parts(msg)[0]
    assert notice.get_content_charset() == "utf-8"
    assert notice["Content-Transfer-Encoding"] == "8bit"
    assert "<jürgen+x@münchen.test>" in text_of(notice)


def test_header_injection_through_addresses_is_neutralized() -> None:
    evil = FailedRecipient(
        "bob@remote.test\r\nX-Injected: 1", None, "5.1.1", "550 no\r\n\r\nX-Also: 2", None, None
    )
    data = bounce(recipients=[evil], sender="alice@example.test\r\nBcc: eve@evil.test")
    msg = parse(data)
    assert "Bcc" not in msg
    assert b"\r\nTo: alice@example.test Bcc: eve@evil.test\r\n" in data
    block = status_blocks(msg)[1]
    assert "X-Injected" not in block and "X-Also" not in block
    assert block["Final-Recipient"] == "rfc822; bob@remote.test X-Injected: 1"


def test_local_findings_are_not_labelled_smtp() -> None:
    rcpt = FailedRecipient(
        "bob@remote.test", None, "4.4.7", "message expired after 5 days in the queue", None, ATTEMPT
    )
    block = status_blocks(parse(bounce(recipients=[rcpt])))[1]
    assert block["Diagnostic-Code"] == "X-trio-mta; message expired after 5 days in the queue"


def test_delayed_only_report_is_worded_as_a_warning() -> None:
    rcpt = FailedRecipient(
        "bob@remote.test", None, "4.4.1", None, "mx.remote.test", ATTEMPT, action="delayed"
    )
    msg = parse(bounce(recipients=[rcpt]))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert status_blocks(msg)[1]["Action"] == "delayed"
    text = " ".join(text_of(parts(msg)[0]).split())
    assert "you do not need to resend your message" in text
    assert "<bob@remote.test>: delivery to host mx.remote.test failed: no answer from host" in text


@pytest.mark.parametrize(
    "bad",
    [
        dict(status="5.1"),
        dict(status="3.1.1"),
        dict(status="5.1.1 "),
        dict(action="expanded"),
    ],
)
def test_invalid_recipient_fields_are_refused(bad: dict[str, str]) -> None:
    fields: dict[str, Any] = dict(
        address="b@x.test",
        original=None,
        status="5.1.1",
        diagnostic=None,
        remote_mta=None,
        last_attempt=None,
    )
    fields.update(bad)
    with pytest.raises(ValueError):
        FailedRecipient(**fields)


def test_a_bounce_needs_recipients() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        build_bounce(
            reporting_mta="mx.example.test",
            sender="a@example.test",
            queue_id="Q",
            arrival=ARRIVAL,
            recipients=[],
            original=ORIGINAL,
        )


def test_returned_headers_are_capped_at_a_field_boundary() -> None:
    """A 9 MB header section used to come back whole: a 9 MB bounce."""
    fields = b"".join(b"X-Filler-%06d: %s\r\n" % (n, b"y" * 80) for n in range(90_000))
    folded = b"X-Folded: start\r\n" + b"".join(b" more %d\r\n" % n for n in range(10_000))
    original = b"Subject: huge\r\n" + fields + folded + b"\r\nbody\r\n"
    assert len(original) > 8_000_000
    data = bounce(original=original)
    assert len(data) < MAX_HEADERS + 8192
    msg = parse(data)
    raw = parts(msg)[2].get_payload(decode=True)
    assert isinstance(raw, bytes)
    assert len(raw) <= MAX_HEADERS
    assert raw.startswith(b"Subject: huge\r\nX-Filler-000000: ")
    assert raw.endswith(b"y\r\n")  # the last field kept is whole
    assert original.startswith(raw)
    text = " ".join(text_of(parts(msg)[0]).split())
    assert f"The returned headers were cut to their first {MAX_HEADERS} octets" in text


def test_a_folded_field_is_never_returned_in_part() -> None:
    original = b"Subject: s\r\nX-Long: a\r\n" + b" b" * 5000 + b"\r\n\r\nbody\r\n"
    raw = parts(parse(bounce(original=original, max_headers=1000)))[2].get_payload(decode=True)
    assert raw == b"Subject: s\r\n"


def test_dsn_fields_come_from_the_recorded_outcome() -> None:
    replied = FailedRecord(
        "bob@remote.test",
        "bob@remote.test",
        Outcome("failed", "5.1.1", "no such user", 550, "mx.remote.test", "192.0.2.1", "rcpt"),
        ATTEMPT,
    )
    ours = FailedRecord(
        "carol@null.test",
        "alias@null.test",
        Outcome("failed", "5.1.10", "null.test does not accept mail (null MX)", stage="dns"),
        ATTEMPT,
    )
    expired = FailedRecord(
        "dave@down.test",
        "dave@down.test",
        Outcome(
            "failed",
            "4.4.7",
            "message expired after 9 attempts; last error: 4.4.1 mx1.down.test [192.0.2.7]:25: "
            "Connection refused; mx2.down.test [192.0.2.8]:25: 421 4.3.2 shutting down",
            stage="queue",
        ),
        ATTEMPT,
    )
    rcpts = [failed_recipient(r) for r in (replied, ours, expired)]
    msg = parse(bounce(recipients=rcpts))
    first, second, third = status_blocks(msg)[1:]
    assert first["Status"] == "5.1.1"
    assert first["Remote-MTA"] == "dns; mx.remote.test"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert second["Status"] == "5.1.10"
    assert second["Original-Recipient"] == "rfc822; alias@null.test"
    assert "Remote-MTA" not in second
    assert second["Diagnostic-Code"] == "X-trio-mta; null.test does not accept mail (null MX)"
    assert third["Status"] == "4.4.7"
    diagnostic = unfolded(third["Diagnostic-Code"])
    assert diagnostic.startswith("X-trio-mta; message expired after 9 attempts")
    assert "[192.0.2.7]:25: Connection refused; mx2.down.test [192.0.2.8]:25: 421 4.3.2" in (
        diagnostic
    )
