"""Envelope path syntax (RFC 5321 §4.1.2, §4.5.3.1; RFC 6531)."""

from __future__ import annotations

import pytest
from hypothesis import given

from trio_mta.smtp import CommandError, Path, parse_path
from trio_mta.smtp.address import quote_local_part

from .smtp_helpers import paths


def rcpt(text: str, utf8: bool = False) -> Path:
    return parse_path(text, smtputf8=utf8, allow_null=False)


def sender(text: str, utf8: bool = False) -> Path:
    return parse_path(text, smtputf8=utf8, allow_null=True)


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("<a@b.example>", "a", "b.example"),
        ("<First.Last+tag@Example.COM>", "First.Last+tag", "Example.COM"),
        ("<!#$%&'*+-/=?^_`{|}~@x>", "!#$%&'*+-/=?^_`{|}~", "x"),
        ('<"john doe"@example.org>', "john doe", "example.org"),
        ('<"a\\"b\\\\c"@example.org>', 'a"b\\c', "example.org"),
        ('<"a..b"@x.y>', "a..b", "x.y"),
        ("<user@[192.0.2.1]>", "user", "[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user", "[IPv6:2001:db8::1]"),
        ("<@relay.one,@relay.two:user@final.example>", "user", "final.example"),
        ("<a@xn--bcher-kva.example>", "a", "xn--bcher-kva.example"),
    ],
)
def test_valid_paths(text: str, local: str, domain: str) -> None:
    assert rcpt(text) == Path(local, domain)


def test_null_path_only_where_allowed() -> None:
    assert sender("<>") == Path("", "")
    assert sender("<>").is_null
    assert str(sender("<>")) == ""
    with pytest.raises(CommandError) as info:
        rcpt("<>")
    assert info.value.reply.code == 501


def test_postmaster_only_for_rcpt() -> None:
    path = rcpt("<Postmaster>")
    assert path == Path("Postmaster", "")
    assert str(path) == "Postmaster" and not path.is_null
    with pytest.raises(CommandError):
        sender("<postmaster>")


@pytest.mark.parametrize(
    "text",
    [
        "a@b",
        "<a@b",
        "<a@b>x",
        "<a b@c>",
        "<a..b@c>",
        "<.a@c>",
        "<a.@c>",
        "<a@-b.c>",
        "<a@b-.c>",
        "<a@b..c>",
        "<a@b.>",
        "<@a>",
        "<a@>",
        "<a>",
        '<""@x>',
        '<"a"b"@x>',
        "<a@[300.1.1.1]>",
        "<a@[1.2.3]>",
        "<a@[IPv6:zz::1]>",
        "<a@[IPv6:fe80::1%eth0]>",
        "<a@[tag:stuff]>",
        "<a@b_c.d>",
        "<a@@b>",
        "<a@b,@c:d@e>",
        "<@a:b>",
        "<a\x00@b>",
        "<a@b\x7f>",
        "<a@[01.2.3.4]>",
    ],
)
def test_invalid_paths(text: str) -> None:
    with pytest.raises(CommandError) as info:
        rcpt(text)
    assert info.value.reply.code == 501
    assert info.value.reply.status == "5.1.3"


def test_non_ascii_needs_smtputf8() -> None:
    with pytest.raises(CommandError) as info:
        rcpt("<jörg@bücher.example>")
    assert (info.value.reply.code, info.value.reply.status) == (553, "5.6.7")
    assert rcpt("<jörg@bücher.example>", utf8=True) == Path("jörg", "bücher.example")
    assert rcpt('<"jö rg"@x>', utf8=True) == Path("jö rg", "x")


def test_length_limits() -> None:
    assert rcpt(f"<{'a' * 64}@x>").local_part == "a" * 64
    with pytest.raises(CommandError):
        rcpt(f"<{'a' * 65}@x>")
    label = "b" * 63
    assert rcpt(f"<a@{label}.x>").domain == f"{label}.x"
    with pytest.raises(CommandError):
        rcpt(f"<a@{'b' * 64}.x>")
    long_domain = ".".join(["c" * 60] * 4)  # 243 octets: path 248
    assert rcpt(f"<a@{long_domain}>").domain == long_domain
    with pytest.raises(CommandError):
        rcpt(f"<{'a' * 20}@{long_domain}>")  # path over 256 octets
    with pytest.raises(CommandError):
        rcpt(f"<a@{'.'.join(['c' * 60] * 5)}>")  # domain over 255 octets


def test_str_requotes_when_needed() -> None:
    assert str(Path("john doe", "x.y")) == '"john doe"@x.y'
    assert str(Path('a"b\\c', "x")) == '"a\\"b\\\\c"@x'
    assert str(Path("plain.name", "x")) == "plain.name@x"
    assert Path("a", "b").address == "a@b"
    assert quote_local_part("a..b") == '"a..b"'
    assert quote_local_part("jörg") == "jörg"


@given(paths)
def test_canonical_form_parses_back(path: Path) -> None:
    text = f"<{path}>"
    if len(text.encode()) > 256 or len(quote_local_part(path.local_part).encode()) > 64:
        return
    assert rcpt(text, utf8=True) == path
