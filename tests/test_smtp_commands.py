"""Command parsing and formatting (RFC 5321 §4.1 and the ESMTP extensions we offer)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mta.smtp import (
    Auth,
    Bdat,
    Command,
    CommandError,
    Data,
    Ehlo,
    Helo,
    Help,
    LocalProtocolError,
    Mail,
    MailParams,
    Noop,
    Path,
    Quit,
    Rcpt,
    RcptParams,
    Rset,
    StartTls,
    Vrfy,
    format_command,
    parse_command,
)

from .smtp_helpers import commands


def refused(line: bytes, **kwargs: bool) -> tuple[int, str | None]:
    with pytest.raises(CommandError) as info:
        parse_command(line, **kwargs)
    return info.value.reply.code, info.value.reply.status


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"EHLO client.example", Ehlo("client.example")),
        (b"ehlo [192.0.2.1]", Ehlo("[192.0.2.1]")),
        (b"EHLO my_pc", Ehlo("my_pc")),
        (b"HELO client.example", Helo("client.example")),
        (b"MAIL FROM:<a@b.example>", Mail(Path("a", "b.example"))),
        (b"mail from:<a@b.example>", Mail(Path("a", "b.example"))),
        (b"MAIL FROM: <a@b.example>", Mail(Path("a", "b.example"))),
        (b"MAIL FROM:<>", Mail(Path("", ""))),
        (
            b"MAIL FROM:<a@b> SIZE=1000 BODY=8BITMIME",
            Mail(Path("a", "b"), MailParams(size=1000, body="8BITMIME")),
        ),
        (
            b"MAIL FROM:<a@b> body=7bit smtputf8",
            Mail(Path("a", "b"), MailParams(body="7BIT", smtputf8=True)),
        ),
        (b"MAIL FROM:<a@b> BODY=BINARYMIME", Mail(Path("a", "b"), MailParams(body="BINARYMIME"))),
        (b"MAIL FROM:<a@b> AUTH=<>", Mail(Path("a", "b"), MailParams(auth="<>"))),
        (
            b"MAIL FROM:<a@b> AUTH=joe+2Bsmith@x",
            Mail(Path("a", "b"), MailParams(auth="joe+smith@x")),
        ),
        (b"MAIL FROM:<a@b>  SIZE=5 ", Mail(Path("a", "b"), MailParams(size=5))),
        (b"MAIL FROM:<j\xc3\xb6rg@b> SMTPUTF8", Mail(Path("jörg", "b"), MailParams(smtputf8=True))),
        (b"RCPT TO:<x@y.example>", Rcpt(Path("x", "y.example"))),
        (b"RCPT TO: <Postmaster>", Rcpt(Path("Postmaster", ""))),
        (b"RCPT TO:<@hop.example:x@y.example>", Rcpt(Path("x", "y.example"))),
        (b"DATA", Data()),
        (b"BDAT 1000", Bdat(1000)),
        (b"BDAT 0 LAST", Bdat(0, True)),
        (b"bdat 12 last", Bdat(12, True)),
        (b"RSET", Rset()),
        (b"NOOP", Noop()),
        (b"NOOP hello there", Noop("hello there")),
        (b"QUIT", Quit()),
        (b"QUIT ", Quit()),
        (b"VRFY bob", Vrfy("bob")),
        (b"HELP", Help()),
        (b"HELP MAIL", Help("MAIL")),
        (b"STARTTLS", StartTls()),
        (b"AUTH PLAIN", Auth("PLAIN")),
        (b"auth plain AGJvYgBzZWNyZXQ=", Auth("PLAIN", "AGJvYgBzZWNyZXQ=")),
        (b"AUTH LOGIN =", Auth("LOGIN", "=")),
    ],
)
def test_parse(line: bytes, command: Command) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize(
    ("line", "code", "status"),
    [
        (b"FROB", 500, "5.5.1"),
        (b"", 500, "5.5.1"),
        (b" MAIL FROM:<a@b>", 500, "5.5.1"),
        (b"MAILFROM:<a@b>", 500, "5.5.1"),
        (b"EXPN staff", 502, "5.5.1"),
        (b"TURN", 502, "5.5.1"),
        (b"EHLO", 501, "5.5.2"),
        (b"EHLO a b", 501, "5.5.2"),
        (b"MAIL", 501, "5.5.2"),
        (b"MAIL TO:<a@b>", 501, "5.5.2"),
        (b"MAIL FROM:a@b", 501, "5.5.2"),
        (b"MAIL FROM <a@b>", 501, "5.5.2"),
        (b"MAIL FROM:<a@b>SIZE=1", 501, "5.5.2"),
        (b"MAIL FROM:<a b@c>", 501, "5.1.3"),
        (b"RCPT TO:<>", 501, "5.1.3"),
        (b"RCPT TO:x@y", 501, "5.5.2"),
        (b"DATA now", 501, "5.5.2"),
        (b"RSET x", 501, "5.5.2"),
        (b"QUIT now", 501, "5.5.2"),
        (b"STARTTLS x", 501, "5.5.2"),
        (b"VRFY", 501, "5.5.2"),
        (b"BDAT", 501, "5.5.2"),
        (b"BDAT x", 501, "5.5.2"),
        (b"BDAT -1", 501, "5.5.2"),
        (b"BDAT 1 FIRST", 501, "5.5.2"),
        (b"BDAT 1234567890123456789", 501, "5.5.2"),
        (b"AUTH", 501, "5.5.2"),
        (b"AUTH PL@IN", 501, "5.5.2"),
        (b"AUTH PLAIN a b", 501, "5.5.2"),
        (b"NOOP \x00", 501, "5.5.2"),
        (b"NOOP \x1b[31m", 501, "5.5.2"),
        (b"NOOP \xff\xfe", 501, "5.5.2"),
        (b"NOOP\tx", 500, "5.5.1"),
        (b"NOOP a\rb", 500, "5.5.2"),
        (b"NOOP a\nb", 500, "5.5.2"),
        (b"MAIL FROM:<a@b> SIZE=1 SIZE=2", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> size=1 SIZE=1", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> FROB=1", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> RET=NONE", 501, "5.5.4"),
        (b"MAIL FROM:<a@b> SIZE=big", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> SIZE", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> SIZE=123456789012345678901", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> BODY=9BIT", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> SMTPUTF8=yes", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> AUTH=a+2", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> AUTH", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> AUTH=", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> BODY=", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> AUTH=a+0D", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> AUTH=+FF", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> =x", 555, "5.5.4"),
        (b"MAIL FROM:<a@b> -X", 555, "5.5.4"),
        (b"RCPT TO:<a@b> NOTIFY=NEVER,DELAY", 501, "5.5.4"),
        (b"RCPT TO:<a@b> X-FLAG", 555, "5.5.4"),
        (b"MAIL FROM:<j\xc3\xb6rg@b>", 553, "5.6.7"),
    ],
)
def test_refused(line: bytes, code: int, status: str) -> None:
    assert refused(line, smtputf8_ok=False) == (code, status)


def test_utf8_in_rcpt_only_inside_an_smtputf8_transaction() -> None:
    line = "RCPT TO:<jörg@bücher.example>".encode()
    assert refused(line, smtputf8_ok=False) == (553, "5.6.7")
    assert parse_command(line, smtputf8_ok=True) == Rcpt(Path("jörg", "bücher.example"))
    # A MAIL line may enable it for itself with the SMTPUTF8 parameter.
    assert refused("MAIL FROM:<jörg@x>".encode(), smtputf8_ok=False) == (553, "5.6.7")
    mail = parse_command("MAIL FROM:<jörg@x> SMTPUTF8".encode(), smtputf8_ok=False)
    assert mail == Mail(Path("jörg", "x"), MailParams(smtputf8=True))
    assert refused("EHLO bücher".encode(), smtputf8_ok=False) == (501, "5.5.2")


def test_line_length_limits() -> None:
    # RFC 5321 §4.5.3.1.4: 512 octets including CRLF.
    assert parse_command(b"NOOP " + b"x" * 505) == Noop("x" * 505)
    assert refused(b"NOOP " + b"x" * 506) == (500, "5.5.2")
    assert refused(b"X" * 600) == (500, "5.5.2")
    # MAIL grows by 26 (RFC 1870 SIZE), 500 (RFC 4954 AUTH=) and 100 (RFC 3461 ENVID, RET).
    auth = b"a" * 480
    line = b"MAIL FROM:<" + b"s" * 60 + b"@example.org> SIZE=1000 AUTH=" + auth
    assert 510 < len(line) <= 1036
    assert parse_command(line) == Mail(
        Path("s" * 60, "example.org"), MailParams(size=1000, auth=auth.decode())
    )
    assert refused(line + b"a" * (1137 - len(line))) == (500, "5.5.2")
    assert refused(b"RCPT TO:<a@b> " + b" " * 1010) == (500, "5.5.2")


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        (Ehlo("c.example"), b"EHLO c.example\r\n"),
        (Mail(Path("", "")), b"MAIL FROM:<>\r\n"),
        (
            Mail(
                Path("a b", "x"),
                MailParams(size=10, body="8BITMIME", smtputf8=True, auth="a+b=c d"),
            ),
            b'MAIL FROM:<"a b"@x> SIZE=10 BODY=8BITMIME SMTPUTF8 AUTH=a+2Bb+3Dc+20d\r\n',
        ),
        (Rcpt(Path("postmaster", "")), b"RCPT TO:<postmaster>\r\n"),
        (
            Rcpt(Path("x", "y"), RcptParams(notify=("SUCCESS", "DELAY"), orcpt="a+b@c")),
            b"RCPT TO:<x@y> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a+2Bb@c\r\n",
        ),
        (Bdat(5), b"BDAT 5\r\n"),
        (Bdat(0, True), b"BDAT 0 LAST\r\n"),
        (Auth("PLAIN", "AGEAYg=="), b"AUTH PLAIN AGEAYg==\r\n"),
        (Auth("LOGIN"), b"AUTH LOGIN\r\n"),
        (Noop(), b"NOOP\r\n"),
        (Help("x"), b"HELP x\r\n"),
    ],
)
def test_format(command: Command, wire: bytes) -> None:
    assert format_command(command) == wire


@pytest.mark.parametrize(
    "command",
    [
        Rcpt(Path("a\r\nDATA", "x")),
        Ehlo("x\r\nMAIL FROM:<a@b>"),
        Noop("\n"),
        Mail(Path("a", "b\r")),
    ],
)
def test_format_refuses_line_breaks(command: Command) -> None:
    with pytest.raises(LocalProtocolError):
        format_command(command)


@given(commands)
def test_parse_inverts_format(command: Command) -> None:
    line = format_command(command)
    assert line.endswith(b"\r\n")
    assert parse_command(line[:-2]) == command


@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_command_error(line: bytes) -> None:
    try:
        command = parse_command(line)
    except CommandError as exc:
        assert 500 <= exc.reply.code < 600
    else:
        # Whatever parses is re-emitted as an equivalent canonical line.
        assert parse_command(format_command(command)[:-2]) == command


@given(
    st.lists(
        st.sampled_from(
            [
                b"MAIL",
                b"RCPT",
                b" ",
                b"FROM:",
                b"TO:",
                b"<",
                b">",
                b"@",
                b"a",
                b".",
                b'"',
                b"\\",
                b"[",
                b"]",
                b"SIZE=",
                b"1",
                b"BODY=",
                b"AUTH=",
                b"+2B",
                b"=",
                b":",
                b",",
                b"\xc3\xa9",
                b"IPv6:",
                b"::1",
                b"SMTPUTF8",
                b"BDAT",
                b"LAST",
            ]
        ),
        max_size=25,
    ).map(b"".join),
    st.booleans(),
)
def test_command_like_bytes_raise_only_command_error(line: bytes, utf8: bool) -> None:
    try:
        command = parse_command(line, smtputf8_ok=utf8)
    except CommandError:
        return
    assert parse_command(format_command(command)[:-2]) == command
