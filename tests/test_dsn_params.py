"""RFC 3461 parameters on MAIL and RCPT: parsing, refusals, xtext (§4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mta.smtp import CommandError, Mail, MailParams, Path, Rcpt, RcptParams, parse_command
from trio_mta.smtp.commands import xtext_decode, xtext_encode

NOTIFY_SYNTAX = "501 5.5.4 Invalid value for NOTIFY (NEVER or SUCCESS,FAILURE,DELAY)"
ORCPT_SYNTAX = "501 5.5.4 Invalid value for ORCPT (rfc822;xtext)"
ENVID_SYNTAX = "501 5.5.4 Invalid value for ENVID (xtext, at most 100)"


def refusal(line: bytes) -> str:
    with pytest.raises(CommandError) as info:
        parse_command(line)
    return str(info.value.reply)


def test_mail_ret_and_envid_are_parsed() -> None:
    assert parse_command(b"MAIL FROM:<a@b> RET=hdrs ENVID=QQ+2B314") == Mail(
        Path("a", "b"), MailParams(ret="HDRS", envid="QQ+314")
    )
    assert parse_command(b"MAIL FROM:<> RET=FULL").params.ret == "FULL"  # type: ignore[union-attr]


def test_rcpt_notify_and_orcpt_are_parsed() -> None:
    assert parse_command(b"RCPT TO:<x@y> NOTIFY=delay,Success ORCPT=RFC822;x+2By@y") == Rcpt(
        Path("x", "y"), RcptParams(notify=("SUCCESS", "DELAY"), orcpt="x+y@y")
    )
    assert parse_command(b"RCPT TO:<x@y> NOTIFY=NEVER") == Rcpt(
        Path("x", "y"), RcptParams(notify=("NEVER",))
    )


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (
            b"RCPT TO:<x@y> NOTIFY=NEVER,SUCCESS",
            "501 5.5.4 NOTIFY=NEVER cannot be combined with other values",
        ),
        (b"RCPT TO:<x@y> NOTIFY=FAILURE,FAILURE", "501 5.5.4 Duplicate value in NOTIFY"),
        (b"RCPT TO:<x@y> NOTIFY=SOMETIMES", NOTIFY_SYNTAX),
        (b"RCPT TO:<x@y> NOTIFY=", NOTIFY_SYNTAX),
        (b"RCPT TO:<x@y> NOTIFY=SUCCESS, ", NOTIFY_SYNTAX),
        (b"RCPT TO:<x@y> NOTIFY", NOTIFY_SYNTAX),
        (b"RCPT TO:<x@y> NOTIFY=NEVER NOTIFY=NEVER", "555 5.5.4 Duplicate parameter: NOTIFY"),
        (b"RCPT TO:<x@y> ORCPT=x400;a", "501 5.5.4 Unsupported ORCPT address type (only rfc822)"),
        (b"RCPT TO:<x@y> ORCPT=a@b", ORCPT_SYNTAX),
        (b"RCPT TO:<x@y> ORCPT=rfc822;", ORCPT_SYNTAX),
        (b"RCPT TO:<x@y> ORCPT=rfc822;a+0Db", ORCPT_SYNTAX),
        (b"RCPT TO:<x@y> ORCPT=rfc822;a+zz", ORCPT_SYNTAX),
        (b"RCPT TO:<x@y> ORCPT=rfc822;" + b"a" * 494, ORCPT_SYNTAX),
        (b"MAIL FROM:<a@b> RET=ALL", "501 5.5.4 Invalid value for RET (FULL or HDRS)"),
        (b"MAIL FROM:<a@b> RET", "501 5.5.4 Invalid value for RET (FULL or HDRS)"),
        (b"MAIL FROM:<a@b> ENVID=", ENVID_SYNTAX),
        (b"MAIL FROM:<a@b> ENVID=" + b"e" * 101, ENVID_SYNTAX),
        (b"MAIL FROM:<a@b> ENVID=a+C3+A9", ENVID_SYNTAX),
        (b"MAIL FROM:<a@b> ENVID=a=b", ENVID_SYNTAX),
    ],
)
def test_bad_dsn_values_are_refused_with_a_clear_reply(line: bytes, reply: str) -> None:
    assert refusal(line) == reply


def test_limits_are_inclusive() -> None:
    envid = b"e" * 100
    assert parse_command(b"MAIL FROM:<a@b> ENVID=" + envid).params.envid == "e" * 100  # type: ignore[union-attr]
    orcpt = b"rfc822;" + b"a" * 493
    assert parse_command(b"RCPT TO:<x@y> ORCPT=" + orcpt).params.orcpt == "a" * 493  # type: ignore[union-attr]


@given(st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=60))
def test_xtext_round_trips(text: str) -> None:
    encoded = xtext_encode(text)
    assert encoded.isascii() and "=" not in encoded and " " not in encoded
    assert xtext_decode(encoded) == text


@pytest.mark.parametrize("bad", ["a+", "a+0", "a+0g", "a b", "a=b", "+0D", "+FF"])
def test_xtext_decode_refuses_invalid_xtext(bad: str) -> None:
    with pytest.raises(ValueError):
        xtext_decode(bad)
