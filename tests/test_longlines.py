"""fit_lines: every outgoing line within 998 octets, with as little damage as possible.

Properties (hypothesis) and the cases that matter by name; the end-to-end test
with a next hop that refuses long lines is in test_outbound.py.
"""

from __future__ import annotations

import email
import email.policy
import quopri
from email.message import EmailMessage

from hypothesis import example, given, settings
from hypothesis import strategies as st

from trio_mta.delivery.longlines import MAX_LINE, fit_lines

# Line content: any octet but CR and LF (a line break inside is a separate case below).
_OCTETS = st.binary(max_size=3000).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_WORDY = st.lists(
    st.text(alphabet="abcdé東 \t", min_size=1, max_size=40), min_size=1, max_size=150
).map(lambda words: " ".join(words).encode())
_HEADER = st.tuples(
    st.sampled_from([b"Subject", b"X-Long", b"To", b"Content-Type", b"Content-Transfer-Encoding"]),
    st.one_of(_OCTETS, _WORDY),
).map(lambda f: f[0] + b": " + f[1])
_BODY = st.lists(st.one_of(_OCTETS, _WORDY), max_size=8)


def lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def message(header: list[bytes], body: list[bytes]) -> bytes:
    return b"".join(h + b"\r\n" for h in header) + b"\r\n" + b"".join(b + b"\r\n" for b in body)


def parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def split(data: bytes) -> tuple[bytes, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


@settings(max_examples=150, deadline=None)
@given(st.lists(_HEADER, max_size=6), _BODY)
@example([b"Subject: " + b"x" * 5000], [b"y" * 5000])
@example([b"Subject: a " + b"\xc3\xa9" * 2000], [])
def test_no_output_line_is_longer_than_998_octets(header: list[bytes], body: list[bytes]) -> None:
    out = fit_lines(message(header, body))
    assert max(len(line) for line in lines(out)) <= MAX_LINE


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_OCTETS, _WORDY), min_size=1, max_size=8))
@example([b"a" * 998 + b" ", b"trailing \t", b"=3D looks encoded", b"." + b"x" * 2000])
def test_a_plain_message_body_decodes_back_to_the_original(body: list[bytes]) -> None:
    original = message([b"Subject: s", b"Content-Type: text/plain; charset=utf-8"], body)
    out = fit_lines(original)
    if out is original:
        return  # nothing was too long
    head, encoded = split(out)
    assert quopri.decodestring(encoded) == split(original)[1]
    assert head.count(b"Content-Transfer-Encoding: quoted-printable") == 1


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(alphabet="abcdé東=:", min_size=1, max_size=60), st.sampled_from([" ", "\t"])
        ),
        min_size=1,
        max_size=400,
    )
)
def test_a_folded_header_unfolds_to_what_it_was(words: list[tuple[str, str]]) -> None:
    """Folding only inserts CRLF before existing whitespace (RFC 5322 §2.2.3)."""
    field = ("Subject:" + "".join(space + word for word, space in words)).encode()
    out = fit_lines(message([field], [b"body"]))
    head, body = split(out)
    assert head.replace(b"\r\n", b"") == field
    assert body == b"body\r\n"
    assert all(line.strip(b" \t") for line in head.split(b"\r\n"))  # no blank fold


def test_a_message_that_fits_is_returned_as_it_is() -> None:
    original = message([b"Subject: s"], [b"x" * MAX_LINE])
    assert fit_lines(original) is original


def test_transfer_encoding_is_replaced_and_mime_version_added() -> None:
    original = message(
        [b"Subject: s", b"Content-Transfer-Encoding:", b" 8bit"], ["é".encode() * 800]
    )
    parsed = parse(fit_lines(original))
    assert parsed["MIME-Version"] == "1.0"
    assert parsed.get_all("Content-Transfer-Encoding") == ["quoted-printable"]
    assert parsed.get_payload(decode=True) == "é".encode() * 800 + b"\r\n"


def test_a_multipart_body_is_broken_as_postfix_breaks_it() -> None:
    head = [b"MIME-Version: 1.0", b'Content-Type: multipart/mixed; boundary="b"']
    body = [b"--b", b"", b"z" * 2500, b"--b--"]
    out = fit_lines(message(head, body))
    assert b"Content-Transfer-Encoding" not in out
    assert b"\r\n" + b"z" * MAX_LINE + b"\r\n " + b"z" * (MAX_LINE - 1) + b"\r\n " in out
    assert out.replace(b"\r\n ", b"") == message(head, body).replace(b"\r\n ", b"")


def test_an_already_encoded_body_is_not_encoded_twice() -> None:
    head = [b"Content-Type: text/plain", b"Content-Transfer-Encoding: base64"]
    out = fit_lines(message(head, [b"QUFB" * 400]))
    assert out.count(b"Content-Transfer-Encoding") == 1
    assert max(len(line) for line in lines(out)) <= MAX_LINE


def test_a_hard_break_never_splits_a_utf8_sequence() -> None:
    out = fit_lines(message([b"X-Long: " + "é".encode() * 1500], [b"body"]))
    head, _ = split(out)
    for line in head.split(b"\r\n"):
        line.decode("utf-8")  # raises if a sequence was cut


def test_bare_line_breaks_in_a_text_body_survive_quoted_printable() -> None:
    body = b"a\rb\nc" + b"d" * 2000 + b"\r\n"
    original = b"Subject: s\r\n\r\n" + body
    _, encoded = split(fit_lines(original))
    assert b"\r" not in encoded.replace(b"\r\n", b"")
    assert quopri.decodestring(encoded) == body


def test_a_message_without_a_header_body_separator_keeps_its_shape() -> None:
    original = b"Subject: " + b"w " * 800 + b"\r\n"
    out = fit_lines(original)
    assert out.replace(b"\r\n ", b" ") == original
    assert max(len(line) for line in lines(out)) <= MAX_LINE
