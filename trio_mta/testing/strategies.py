"""Hypothesis strategies for mail data that is valid by the RFCs (SPEC §14).

Each strategy generates only what the grammar allows, so a property test that
feeds it to the code under test finds that code's bugs, not the generator's:

- :func:`domains`: RFC 5321 §4.1.2 domains (LDH labels of at most 63 octets,
  at most 253 octets in all, an alphabetic character in the last label as
  RFC 1123 §2.1 asks);
- :func:`addresses`: RFC 5321 mailboxes as text: dot-strings and quoted
  local parts (quoted-pairs included), domains and address literals
  (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), within the §4.5.3.1 size limits;
  with ``smtputf8=True`` the local parts may hold non-ASCII characters
  (RFC 6531 §3.3, NFC as RFC 6532 §3.1 asks);
- :func:`messages`: RFC 5322 messages as bytes with CRLF line ends: From,
  To, Date, Subject (sometimes folded), often a Message-ID and extra fields,
  a body with empty lines, lines that start with a dot or ``From ``, and
  lines of up to 998 octets; ``eight_bit=True`` adds UTF-8 bodies declared
  ``Content-Transfer-Encoding: 8bit`` (send them with BODY=8BITMIME);
- :func:`commands`: one SMTP command line (bytes, CRLF-terminated, at most
  512 octets) per example, from the verbs asked for.

trio_mta's own test suite proves these against independent code: smtplib
sends them, aiosmtpd accepts them, ``email`` parses them without defects and
trio_mta's parser and ``smtp_capture`` accept them.
"""

from __future__ import annotations

import datetime
import email.utils
import string
import unicodedata
from collections.abc import Sequence

from hypothesis import strategies as st

__all__ = ["addresses", "commands", "domains", "local_parts", "messages"]

MAX_LABEL = 63  # RFC 1035 §2.3.4
MAX_DOMAIN = 253  # 255 octets on the wire (RFC 1035 §3.1) is 253 characters as text
MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1
MAX_PATH = 256  # RFC 5321 §4.5.3.1.3, "<" and ">" included
MAX_LINE = 998  # RFC 5322 §2.1.1, CRLF excluded
MAX_COMMAND = 512  # RFC 5321 §4.5.3.1.4, CRLF included

_LETDIG = string.ascii_letters + string.digits
_ATEXT = _LETDIG + "!#$%&'*+-/=?^_`{|}~"
# qtextSMTP: %d32-33 / %d35-91 / %d93-126 (RFC 5321 §4.1.2)
_QTEXT = "".join(chr(c) for c in range(32, 127) if chr(c) not in '"\\')
_PRINTABLE = "".join(chr(c) for c in range(32, 127))
# Unstructured header text: visible ASCII but "=" (no accidental encoded-word "=?...?=").
_HEADER_TEXT = "".join(chr(c) for c in range(33, 127) if chr(c) != "=")
# Letters and digits beyond ASCII, for SMTPUTF8 local parts and UTF-8 text.
_NON_ASCII = st.characters(min_codepoint=0x80, categories=("Ll", "Lu", "Lo", "Nd"))


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


# ------------------------------------------------------------------ domains

_LDH = _LETDIG + "-"


def _label(first: str, max_size: int) -> st.SearchStrategy[str]:
    """Let-dig [*(Let-dig / "-") Let-dig], up to ``max_size`` characters."""
    longer = st.builds(
        lambda a, mid, b: a + mid + b,
        st.sampled_from(first),
        st.text(_LDH, max_size=max_size - 2),
        st.sampled_from(_LETDIG),
    )
    return st.sampled_from(first) | longer


_labels = _label(_LETDIG, MAX_LABEL) | _label(string.ascii_lowercase + string.digits, 10)
_top_labels = _label(string.ascii_letters, 22)


def domains(*, max_length: int = MAX_DOMAIN) -> st.SearchStrategy[str]:
    """Domain names: one to five LDH labels, the last starting with a letter."""
    body = st.lists(_labels, min_size=0, max_size=4)
    return st.builds(lambda labels, top: ".".join([*labels, top]), body, _top_labels).filter(
        lambda name: len(name) <= max_length
    )


def _address_literals() -> st.SearchStrategy[str]:
    """RFC 5321 §4.1.3 address literals (canonical text, so every parser agrees)."""
    v4 = st.ip_addresses(v=4).map(lambda ip: f"[{ip}]")
    v6 = st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip.compressed}]")
    return v4 | v6


# ------------------------------------------------------------------ local parts


def _atoms(smtputf8: bool) -> st.SearchStrategy[str]:
    ascii_atoms = st.text(_ATEXT, min_size=1, max_size=12)
    if not smtputf8:
        return ascii_atoms
    mixed = st.lists(st.sampled_from(_LETDIG) | _NON_ASCII, min_size=1, max_size=8).map("".join)
    return ascii_atoms | mixed


def local_parts(*, smtputf8: bool = False) -> st.SearchStrategy[str]:
    """Local parts in their wire form: a dot-string, or a quoted-string with quoted-pairs."""
    dot_string = st.lists(_atoms(smtputf8), min_size=1, max_size=4).map(".".join)
    qchar = st.sampled_from(_QTEXT) | st.sampled_from(_PRINTABLE).map(lambda c: "\\" + c)
    if smtputf8:
        qchar = qchar | _NON_ASCII
    quoted = st.lists(qchar, min_size=1, max_size=20).map(lambda cs: '"' + "".join(cs) + '"')
    return st.one_of(dot_string, dot_string, quoted).filter(
        lambda lp: _octets(lp) <= MAX_LOCAL_PART and unicodedata.normalize("NFC", lp) == lp
    )


def addresses(*, smtputf8: bool = False, literals: bool = True) -> st.SearchStrategy[str]:
    """Mailboxes as text (``local@domain``), fitting in an RFC 5321 path (256 octets).

    ``smtputf8=True``: local parts may be non-ASCII, so send them with SMTPUTF8.
    ``literals=False``: no address literals, only domain names.
    """
    domain = domains()
    if literals:
        domain = st.one_of(domain, domain, domain, _address_literals())
    return st.builds(lambda lp, d: f"{lp}@{d}", local_parts(smtputf8=smtputf8), domain).filter(
        lambda addr: _octets(addr) + 2 <= MAX_PATH
    )


# ------------------------------------------------------------------ messages


# Whole tokens keep examples cheap to draw (a few draws per line, not one per
# character) while covering what parsers trip over; short random text adds the rest.
_HEADER_TOKENS = (
    "Re:",
    "Fwd:",
    "hello",
    "World",
    "a",
    "(comment)",
    "<angle>",
    '"q"',
    "x@y",
    "50%",
    "a.b",
    "--",
    "#1",
    "[tag]",
    "it's",
    "~",
    "!",
    "semi;",
    "c:",
)
_BODY_TOKENS = (
    *_HEADER_TOKENS,
    " ",
    "  ",
    "\t",
    "=",
    "=20",
    "=?x?q?y?=",
    "From ",
    ">",
    ".",
    "..",
    "\\",
    "{}",
    "0123456789",
    "Subject: not a header",
    "-- ",
)


def _words(alphabet: str, smtputf8: bool) -> st.SearchStrategy[str]:
    words = st.sampled_from(_HEADER_TOKENS) | st.text(alphabet, min_size=1, max_size=8)
    if not smtputf8:
        return words
    return words | st.lists(_NON_ASCII, min_size=1, max_size=6).map("".join)


def _unstructured(smtputf8: bool) -> st.SearchStrategy[str]:
    """Header text of words, folded (CRLF + space) every few words."""

    def fold(words: list[str]) -> str:
        out: list[str] = []
        width = 0
        for word in words:
            if out and width + len(word) > 60:
                out.append("\r\n ")
                width = 1
            elif out:
                out.append(" ")
                width += 1
            out.append(word)
            width += len(word)
        return "".join(out)

    return st.lists(_words(_HEADER_TEXT, smtputf8), min_size=1, max_size=15).map(fold)


_dates = st.builds(
    lambda when, minutes: when.replace(
        tzinfo=datetime.timezone(datetime.timedelta(minutes=minutes))
    ),
    st.datetimes(
        min_value=datetime.datetime(1990, 1, 1), max_value=datetime.datetime(2099, 12, 31)
    ).map(lambda d: d.replace(microsecond=0)),
    st.integers(-12 * 60, 14 * 60),
).map(email.utils.format_datetime)

_field_names = st.text(_LETDIG, min_size=1, max_size=15).map(lambda name: "X-" + name)
_message_ids = st.builds(
    lambda left, right: f"<{left}@{right}>",
    st.lists(st.text(_ATEXT, min_size=1, max_size=10), min_size=1, max_size=3).map(".".join),
    domains(max_length=60),
)


def _long_line(alphabet: str) -> st.SearchStrategy[str]:
    """A line of 900 to 998 octets, built from a short random seed (cheap to draw)."""
    return st.builds(
        lambda seed, n: (seed * (n // len(seed) + 1))[:n],
        st.text(alphabet, min_size=1, max_size=20),
        st.integers(900, MAX_LINE),
    )


def _body_lines(eight_bit: bool) -> st.SearchStrategy[list[str]]:
    tokens = st.lists(st.sampled_from(_BODY_TOKENS), min_size=1, max_size=12).map("".join)
    text = tokens | st.text(_PRINTABLE, max_size=20)
    line = st.one_of(
        text,
        text.map(lambda t: "." + t),  # dot-stuffing must be applied and undone
        st.sampled_from([".", "..", "...", "From here", ">From there", " ", "\t"]),
        st.just(""),
        _long_line(_PRINTABLE),
    )
    if eight_bit:
        utf8 = st.lists(st.sampled_from(_BODY_TOKENS) | _NON_ASCII, max_size=12).map("".join)
        line = line | utf8 | utf8.map(lambda t: "." + t)
    return st.lists(line, max_size=20).map(
        lambda lines: [ln for ln in lines if _octets(ln) <= MAX_LINE]
    )


@st.composite
def _message(draw: st.DrawFn, eight_bit: bool, smtputf8: bool) -> bytes:
    sender = draw(addresses(smtputf8=smtputf8))
    to = draw(st.lists(addresses(smtputf8=smtputf8), min_size=1, max_size=3))
    fields = [
        f"From: {sender}",
        "To: " + ",\r\n ".join(to),  # one address per line: never over 998 octets
        f"Date: {draw(_dates)}",
        f"Subject: {draw(_unstructured(smtputf8))}",
    ]
    if draw(st.booleans()):
        fields.append(f"Message-ID: {draw(_message_ids)}")
    for name in draw(st.lists(_field_names, max_size=2, unique_by=str.lower)):
        fields.append(f"{name}: {draw(_unstructured(smtputf8))}")
    if eight_bit:
        fields += [
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ]
    fields = draw(st.permutations(fields))
    body = draw(_body_lines(eight_bit))
    text = "".join(f + "\r\n" for f in fields) + "\r\n" + "".join(ln + "\r\n" for ln in body)
    return text.encode("utf-8")


def messages(*, eight_bit: bool = False, smtputf8: bool = False) -> st.SearchStrategy[bytes]:
    """RFC 5322 messages as bytes, every line CRLF-terminated and at most 998 octets.

    ``eight_bit``: UTF-8 body lines (declared 8bit: send with BODY=8BITMIME).
    ``smtputf8``: UTF-8 in addresses and header text (RFC 6532: send with SMTPUTF8).
    """
    return _message(eight_bit, smtputf8)


# ------------------------------------------------------------------ commands

COMMAND_VERBS = ("EHLO", "HELO", "MAIL", "RCPT", "RSET", "NOOP", "VRFY", "HELP")
"""The default verbs: none of them changes the framing (DATA, STARTTLS) or ends the
session (QUIT), so a test can send any sequence on one connection."""
OTHER_VERBS = ("DATA", "QUIT", "STARTTLS")

_strings = st.text(_ATEXT, min_size=1, max_size=20) | st.lists(
    st.sampled_from(_QTEXT), min_size=1, max_size=20
).map(lambda cs: '"' + "".join(cs) + '"')


def _mail(smtputf8: bool) -> st.SearchStrategy[str]:
    params = st.lists(
        st.one_of(
            st.integers(0, 10**9).map(lambda n: f"SIZE={n}"),
            st.sampled_from(["BODY=7BIT", "BODY=8BITMIME"]),
            *([st.just("SMTPUTF8")] if smtputf8 else []),
        ),
        max_size=3,
        unique_by=lambda p: p.split("=")[0],
    )
    path = st.just("") | addresses(smtputf8=smtputf8)

    def line(path: str, params: list[str]) -> str:
        if not path.isascii() and "SMTPUTF8" not in params:
            params = [*params, "SMTPUTF8"]  # RFC 6531 §3.4: a UTF-8 path needs it
        return " ".join([f"MAIL FROM:<{path}>", *params])

    return st.builds(line, path, params)


def commands(
    *, verbs: Sequence[str] = COMMAND_VERBS, smtputf8: bool = False
) -> st.SearchStrategy[bytes]:
    """One SMTP command line (RFC 5321 §4.1.1 syntax), UTF-8 bytes ending in CRLF.

    ``verbs``: any of EHLO HELO MAIL RCPT RSET NOOP VRFY HELP DATA QUIT STARTTLS.
    ``smtputf8=True``: MAIL may carry SMTPUTF8 and non-ASCII addresses; a server
    only accepts a non-ASCII RCPT inside such a transaction (RFC 6531 §3.4).
    Each line is valid on its own; MAIL parameters (SIZE=, BODY=) need a session
    opened with EHLO, not HELO (RFC 5321 §4.1.1.1).
    """
    builders: dict[str, st.SearchStrategy[str]] = {
        "EHLO": (domains() | _address_literals()).map(lambda d: f"EHLO {d}"),
        "HELO": domains().map(lambda d: f"HELO {d}"),
        "MAIL": _mail(smtputf8),
        "RCPT": (addresses(smtputf8=smtputf8) | st.just("Postmaster")).map(
            lambda a: f"RCPT TO:<{a}>"
        ),
        "RSET": st.just("RSET"),
        "NOOP": st.just("NOOP") | _strings.map(lambda s: f"NOOP {s}"),
        "VRFY": _strings.map(lambda s: f"VRFY {s}"),
        # HELP's argument names a command, as clients ask (RFC 5321 §4.1.1.8).
        "HELP": st.just("HELP") | st.sampled_from(COMMAND_VERBS).map(lambda v: f"HELP {v}"),
        "DATA": st.just("DATA"),
        "QUIT": st.just("QUIT"),
        "STARTTLS": st.just("STARTTLS"),
    }
    unknown = [v for v in verbs if v.upper() not in builders]
    if unknown or not verbs:
        raise ValueError(f"commands(): unknown verbs {unknown}; known: {sorted(builders)}")
    return (
        st.one_of([builders[v.upper()] for v in verbs])
        .map(lambda line: line.encode("utf-8") + b"\r\n")
        .filter(lambda b: len(b) <= MAX_COMMAND)
    )
