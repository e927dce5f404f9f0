"""DKIM: our signatures checked by OpenDKIM and dkimpy; inbound signatures of others checked.

Signing side: RSA 2048 and Ed25519 signatures made by trio_mta.auth.signing must
verify in OpenDKIM (an independent C implementation) and in dkimpy. Verifying side:
signatures made by dkimpy's own signer (pure-Python RSA, pynacl Ed25519: none of our
signing code) verify as pass; any change to a signed header or the body is a fail.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import dkim
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import Relaxed as DkimpyRelaxed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.encoding import Base64Encoder

from trio_mta.auth import dkim_verify
from trio_mta.auth.dkim_verify import KeyAnswer
from trio_mta.auth.inbound import Verifier
from trio_mta.auth.signing import (
    SIGNED_HEADERS,
    Relaxed,
    Signer,
    header_digest,
    rfc822_parse,
)
from trio_mta.config.loader import VerifyConfig
from trio_mta.dns import Resolver

from .authhelpers import OPENDKIM, KeyPair, make_key, opendkim_verify, unique_domain
from .dnsserver import DnsServer

needs_opendkim = pytest.mark.skipif(OPENDKIM is None, reason="opendkim is not installed")

MESSAGE = (
    b"From: Alice Example <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Cc: carol@example.net\r\n"
    b"Subject: a subject\r\n that is folded  \r\n"
    b"Date: Wed, 02 Dec 2026 03:00:00 +0000\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Unsigned: left alone\r\n"
    b"\r\n"
    b"Hello  Bob, \r\n"
    b".a line with a dot\r\n"
    b"\r\n\r\n"
)


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dkim-keys")


@pytest.fixture(scope="module")
def rsa_key(keydir: Path) -> KeyPair:
    return make_key(keydir, "example.org", "rsa2026", "rsa")


@pytest.fixture(scope="module")
def ed_key(keydir: Path) -> KeyPair:
    return make_key(keydir, "example.org", "ed2026", "ed25519")


def signature_fields(message: bytes) -> list[bytes]:
    return re.findall(rb"^DKIM-Signature:.*?\r\n(?! )(?!\t)", message, re.M | re.S)


def only_signature(signed: bytes, index: int) -> bytes:
    """*signed* keeping just its index-th DKIM-Signature (OpenDKIM -t reports the first)."""
    fields = signature_fields(signed)
    rest = signed
    for field in fields:
        rest = rest.replace(field, b"", 1)
    return fields[index] + rest


def answers(*pairs: KeyPair) -> dict[str, KeyAnswer]:
    return {p.name: KeyAnswer((p.record.encode(),)) for p in pairs}


def check(message: bytes, *pairs: KeyPair) -> list[str]:
    found = dkim_verify.signatures(message)
    return [r.result for r in dkim_verify.verify(message, found, answers(*pairs))]


# -- signing -------------------------------------------------------------------------------


@needs_opendkim
@pytest.mark.parametrize("which", ["rsa", "ed25519"])
def test_opendkim_verifies_our_signature(
    which: str, rsa_key: KeyPair, ed_key: KeyPair, tmp_path: Path
) -> None:
    pair = rsa_key if which == "rsa" else ed_key
    signed = Signer([pair.key]).sign(MESSAGE) + MESSAGE
    [verdict] = opendkim_verify(signed, [pair], tmp_path)
    assert "succeeded" in verdict, verdict
    assert f"s={pair.key.selector}" in verdict
    # ... and the control: one changed body byte and OpenDKIM says no.
    [tampered] = opendkim_verify(signed.replace(b"Hello", b"Jello"), [pair], tmp_path)
    assert "failed" in tampered, tampered


@pytest.mark.parametrize("which", ["rsa", "ed25519"])
def test_dkimpy_verifies_our_signature(which: str, rsa_key: KeyPair, ed_key: KeyPair) -> None:
    pair = rsa_key if which == "rsa" else ed_key
    signed = Signer([pair.key]).sign(MESSAGE) + MESSAGE
    records = {(pair.name + ".").encode(): pair.record.encode()}
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: records.get(name))
    assert not dkim.verify(
        signed.replace(b"Subject: a", b"Subject: A"),
        dnsfunc=lambda name, timeout=5: records.get(name),
    )


@needs_opendkim
def test_two_keys_for_a_domain_give_two_signatures_both_valid(
    rsa_key: KeyPair, ed_key: KeyPair, tmp_path: Path
) -> None:
    signed = Signer([rsa_key.key, ed_key.key]).sign(MESSAGE) + MESSAGE
    fields = signature_fields(signed)
    assert [b"a=rsa-sha256" in f for f in fields] == [True, False]
    assert b"a=ed25519-sha256" in fields[1]
    assert check(signed, rsa_key, ed_key) == ["pass", "pass"]
    for index, pair in enumerate([rsa_key, ed_key]):
        [verdict] = opendkim_verify(only_signature(signed, index), [pair], tmp_path)
        assert "succeeded" in verdict, verdict


def test_signature_covers_the_spec_headers_and_oversigns_from(ed_key: KeyPair) -> None:
    [field] = signature_fields(Signer([ed_key.key]).sign(MESSAGE))
    h = re.search(rb"h=([^;]*);", field)
    assert h is not None
    names = re.sub(rb"\s", b"", h.group(1)).split(b":")
    assert names == [
        b"from",
        b"to",
        b"cc",
        b"subject",
        b"date",
        b"message-id",
        b"mime-version",
        b"content-type",
        b"from",
    ]
    assert b"c=relaxed/relaxed" in field and b"d=example.org" in field
    # Over-signing: a second From: added later breaks the signature.
    signed = Signer([ed_key.key]).sign(MESSAGE) + MESSAGE
    assert check(signed, ed_key) == ["pass"]
    forged = signed.replace(b"To: bob", b"From: mallory@evil.test\r\nTo: bob", 1)
    assert check(forged, ed_key) == ["fail"]


# Every header SIGNED_HEADERS names: h= is longer than a line.
REPLY = (
    b"From: Alice Example <alice@example.org>\r\nTo: bob@example.net\r\n"
    b"Cc: carol@example.net\r\nSubject: Re: a subject\r\n"
    b"Date: Wed, 02 Dec 2026 03:00:00 +0000\r\nMessage-ID: <m2@example.org>\r\n"
    b"Reply-To: alice@example.org\r\nIn-Reply-To: <m1@example.net>\r\n"
    b"References: <m0@example.net> <m1@example.net>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\nHello again\r\n"
)


@pytest.mark.parametrize("which", ["rsa", "ed25519"])
def test_a_long_h_list_is_folded_between_names_never_inside_one(
    which: str, rsa_key: KeyPair, ed_key: KeyPair, tmp_path: Path
) -> None:
    # Found by fuzz/fuzz_dkim.py: dkimpy's fold() cut h= at column 72 inside a name
    # ("mi\r\n me-version"), so a reply carrying the usual headers failed everywhere.
    pair = rsa_key if which == "rsa" else ed_key
    [field] = signature_fields(Signer([pair.key]).sign(REPLY))
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    h = re.search(rb"h=([^;]*);", field)
    assert h is not None
    names = re.split(rb"\s*:\s*", h.group(1).strip())
    assert sorted(set(names)) == sorted(SIGNED_HEADERS)
    signed = field + REPLY
    assert check(signed, pair) == ["pass"]
    if OPENDKIM is not None:
        [verdict] = opendkim_verify(signed, [pair], tmp_path)
        assert "succeeded" in verdict, verdict


def test_subdomain_from_is_signed_by_the_parent_entry_other_domains_not(ed_key: KeyPair) -> None:
    signer = Signer([ed_key.key])
    sub = MESSAGE.replace(b"alice@example.org", b"alice@news.example.org")
    assert b"d=example.org" in signer.sign(sub)
    assert signer.sign(MESSAGE.replace(b"alice@example.org", b"alice@example.com")) == b""
    assert signer.sign(MESSAGE.replace(b"alice@example.org", b"alice@badexample.org")) == b""
    assert signer.sign(b"Subject: no from\r\n\r\nbody\r\n") == b""


_header_name = st.sampled_from(
    [
        "From",
        "To",
        "Cc",
        "Subject",
        "Date",
        "Message-ID",
        "Reply-To",
        "References",
        "X-Other",
        "Content-Type",
    ]
)
_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)
_value = st.lists(
    st.tuples(_text, st.sampled_from([" ", "  ", "\t", "\r\n ", "\r\n\t"])), min_size=1, max_size=4
).map(lambda parts: "".join(a + b for a, b in parts))
_line = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60
) | st.sampled_from(["", " ", "\t", "trailing  ", "  lead"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.lists(st.tuples(_header_name, _value), max_size=8),
    body=st.lists(_line, max_size=12),
    trailing=st.sampled_from(["", "\r\n", "\r\n\r\n"]),
)
def test_sign_then_verify_round_trips_under_relaxed_canonicalisation(
    ed_key: KeyPair,
    rsa_key: KeyPair,
    headers: list[tuple[str, str]],
    body: list[str],
    trailing: str,
) -> None:
    head = "From: someone@example.org\r\n" + "".join(
        f"{name}: {value.rstrip(chr(10)).rstrip(chr(13))}\r\n"
        for name, value in headers
        if not value.endswith(("\r\n ", "\r\n\t"))
    )
    message = (head + "\r\n" + "".join(line + "\r\n" for line in body) + trailing).encode()
    signed = Signer([rsa_key.key, ed_key.key]).sign(message) + message
    assert check(signed, rsa_key, ed_key) == ["pass", "pass"]
    # Relaxed canonicalisation forgives whitespace changes in transit (RFC 6376 §3.4.2,
    # §3.4.4): trailing spaces added to every body line, header whitespace doubled.
    head_part, _, body_part = signed.partition(b"\r\n\r\n")
    loosened = head_part.replace(b": ", b":  ") + b"\r\n\r\n" + body_part.replace(b"\r\n", b" \r\n")
    assert check(loosened, rsa_key, ed_key) == ["pass", "pass"]


# -- verifying signatures made by someone else (dkimpy's signer) ------------------------------


def dkimpy_sign(message: bytes, pair: KeyPair, *, canon: tuple[bytes, bytes]) -> bytes:
    private = pair.key.private
    if pair.key.algorithm == "rsa":
        secret = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        algorithm = b"rsa-sha256"
    else:
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        secret = Base64Encoder.encode(raw)
        algorithm = b"ed25519-sha256"
    field: bytes = dkim.sign(
        message,
        pair.key.selector.encode(),
        pair.key.domain.encode(),
        secret,
        canonicalize=canon,
        signature_algorithm=algorithm,
    )
    return field + message


@pytest.mark.parametrize("which", ["rsa", "ed25519"])
@pytest.mark.parametrize("canon", [(b"relaxed", b"relaxed"), (b"simple", b"simple")])
def test_signatures_by_another_signer_pass_and_any_change_fails(
    which: str, canon: tuple[bytes, bytes], rsa_key: KeyPair, ed_key: KeyPair
) -> None:
    pair = rsa_key if which == "rsa" else ed_key
    signed = dkimpy_sign(MESSAGE, pair, canon=canon)
    assert check(signed, pair) == ["pass"]
    assert check(signed.replace(b"Hello", b"Hullo"), pair) == ["fail"]
    assert check(signed.replace(b"Subject: a subject", b"Subject: b subject"), pair) == ["fail"]
    assert check(signed.replace(b"bob@example.net", b"eve@example.net"), pair) == ["fail"]


def test_no_key_bad_key_and_malformed_signature_are_permerror(rsa_key: KeyPair) -> None:
    signed = dkimpy_sign(MESSAGE, rsa_key, canon=(b"relaxed", b"relaxed"))
    found = dkim_verify.signatures(signed)
    assert [r.result for r in dkim_verify.verify(signed, found, {})] == ["temperror"]
    none = {rsa_key.name: KeyAnswer(())}
    assert [r.result for r in dkim_verify.verify(signed, found, none)] == ["permerror"]
    garbage = {rsa_key.name: KeyAnswer((b"v=DKIM1; k=rsa; p=notbase64!!",))}
    assert [r.result for r in dkim_verify.verify(signed, found, garbage)] == ["permerror"]
    broken = b"DKIM-Signature: v=1; this is not a tag list\r\n" + MESSAGE
    assert check(broken) == ["permerror"]


def test_a_key_whose_h_tag_leaves_out_the_hash_is_not_used(ed_key: KeyPair) -> None:
    # Found by fuzz/fuzz_dkim.py: dkimpy ignores the key's h=; RFC 6376 §6.1.2 says a
    # key whose h= does not list the signature's hash algorithm must not verify it.
    signed = Signer([ed_key.key]).sign(MESSAGE) + MESSAGE
    found = dkim_verify.signatures(signed)
    key = ed_key.record.replace("; p=", "; h={}; p=")

    def result(h: str) -> str:
        answer = {ed_key.name: KeyAnswer((key.format(h).encode(),))}
        [got] = dkim_verify.verify(signed, found, answer)
        return got.result

    assert result("sha1") == "permerror"
    assert result("sha256") == "pass"
    assert result("sha1 :\r\n\tsha256") == "pass"
    assert result("sha512:future") == "permerror"


def test_a_message_that_begins_with_a_continuation_line_is_unparsable_not_a_crash(
    ed_key: KeyPair,
) -> None:
    # Found by fuzz/fuzz_dkim.py: dkimpy's rfc822_parse raises IndexError on a first
    # line that starts with white space, and parse() let it out of end of DATA.
    for message in (b" folded\r\nFrom: a@example.org\r\n\r\nbody\r\n", b"\t\r\n" + MESSAGE):
        assert dkim_verify.parse(message) is None
        assert dkim_verify.signatures(message) == []
        assert Signer([ed_key.key]).sign(message) == b""


# -- through the trio resolver --------------------------------------------------------------


async def test_verifier_fetches_keys_through_the_loopback_dns(
    dns_server: DnsServer, keydir: Path
) -> None:
    domain = unique_domain("k")
    good = make_key(keydir, domain, "s1", "ed25519")
    good.publish(dns_server)
    missing = make_key(keydir, domain, "unpublished", "rsa")
    flaky_domain = unique_domain("sf")
    flaky = make_key(keydir, flaky_domain, "s1", "rsa")
    dns_server.servfail(f"s1._domainkey.{flaky_domain}.")
    message = MESSAGE.replace(b"example.org", domain.encode())
    signed = dkimpy_sign(message, good, canon=(b"relaxed", b"relaxed"))
    signed = dkimpy_sign(signed, missing, canon=(b"relaxed", b"relaxed"))
    signed = dkimpy_sign(signed, flaky, canon=(b"relaxed", b"relaxed"))
    resolver = Resolver([dns_server.address], timeout=2.0)
    verifier = Verifier(
        VerifyConfig(spf=False, dmarc=False), resolver, hostname="mx.example.test", dns_timeout=2.0
    )
    with trio.fail_after(10):
        outcome = await verifier.begin(
            client_ip="192.0.2.1", sender="", helo="x.test"
        ).at_end_of_data(signed)
    assert outcome.dkim is not None
    got = [(r.result, r.domain, r.selector) for r in outcome.dkim]
    # Top signature first: the last one added is on top.
    assert got == [
        ("temperror", flaky_domain, "s1"),
        ("permerror", domain, "unpublished"),
        ("pass", domain, "s1"),
    ]
    header = outcome.header.decode()
    assert header.startswith("Authentication-Results: mx.example.test;\r\n\t")
    [passed] = [c for c in header.split(";") if "dkim=pass" in c]
    assert f"header.d={domain}" in passed and "header.s=s1" in passed, header
    assert "spf=" not in header and "dmarc=" not in header


async def test_spf_and_dkim_waits_overlap_when_neither_is_cached(
    dns_server: DnsServer, keydir: Path
) -> None:
    """A silent name server for both the sender's SPF record and the signature's key:
    the check takes one DNS timeout, not two, and both come out temperror."""
    domain = unique_domain("both")
    key = make_key(keydir, domain, "s1", "ed25519")
    dns_server.blackhole(f"{domain}.")
    dns_server.blackhole(f"s1._domainkey.{domain}.")
    signed = dkimpy_sign(
        MESSAGE.replace(b"example.org", domain.encode()), key, canon=(b"relaxed", b"relaxed")
    )
    resolver = Resolver([dns_server.address], timeout=1.0)
    verifier = Verifier(
        VerifyConfig(dmarc=False), resolver, hostname="mx.example.test", dns_timeout=1.0
    )
    start = trio.current_time()
    with trio.fail_after(10):
        outcome = await verifier.begin(
            client_ip="192.0.2.1", sender=f"a@{domain}", helo="x.test"
        ).at_end_of_data(signed)
    elapsed = trio.current_time() - start
    assert outcome.spf is not None and outcome.spf.result == "temperror"
    assert outcome.dkim is not None and [r.result for r in outcome.dkim] == ["temperror"]
    assert 0.9 <= elapsed < 1.7, elapsed


async def test_verifier_reports_no_signature_for_a_message_it_cannot_parse(
    dns_server: DnsServer,
) -> None:
    resolver = Resolver([dns_server.address], timeout=2.0)
    verifier = Verifier(
        VerifyConfig(spf=False, dmarc=True), resolver, hostname="mx.example.test", dns_timeout=2.0
    )
    with trio.fail_after(10):
        outcome = await verifier.begin(
            client_ip="192.0.2.1", sender="", helo="x.test"
        ).at_end_of_data(b" starts folded\r\n" + MESSAGE)
    assert outcome.dkim == ()
    assert outcome.dmarc is not None and outcome.dmarc.result == "permerror"
    assert b"dkim=none" in outcome.header


async def test_big_messages_are_signed_and_verified_off_the_event_loop(
    dns_server: DnsServer, keydir: Path, tmp_path: Path
) -> None:
    """Above the thread threshold, hashing runs in a worker thread; results are the same."""
    from trio_mta.auth.inbound import THREAD_THRESHOLD
    from trio_mta.auth.service import MailAuth
    from trio_mta.config import Config

    domain = unique_domain("big")
    pair = make_key(keydir, domain, "s1", "ed25519")
    pair.publish(dns_server)
    config = Config.from_mapping(
        {
            "hostname": "mx.example.test",
            "dns": {"nameservers": ["{}:{}".format(*dns_server.address)], "timeout": "2s"},
            "dkim": {"sign": [{"domain": domain, "selector": "s1", "key": str(pair.key.path)}]},
        },
        base_dir=tmp_path,
    )
    auth = MailAuth(config)
    line = b"A line of a big message, long enough to add up quickly.\r\n"
    big = f"From: a@{domain}\r\nSubject: big\r\n\r\n".encode() + line * (
        2 * THREAD_THRESHOLD // len(line)
    )
    signed = await auth.sign(big, queue_id="Q1") + big
    assert auth.verifier is not None
    outcome = await auth.verifier.begin(
        client_ip="192.0.2.1", sender="", helo="x.test"
    ).at_end_of_data(signed)
    assert outcome.dkim is not None and [r.result for r in outcome.dkim] == ["pass"]
    tampered = signed[:-10] + b"tampered\r\n"
    outcome = await auth.verifier.begin(
        client_ip="192.0.2.1", sender="", helo="x.test"
    ).at_end_of_data(tampered)
    assert outcome.dkim is not None and [r.result for r in outcome.dkim] == ["fail"]


# Bytes that matter to relaxed canonicalisation, and some that must be left alone.
_CANON_BYTES = st.binary(max_size=300) | st.lists(
    st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x0b", b"\x0c", b"a", b"\xff", b":"]),
    max_size=60,
).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(
    headers=st.lists(st.tuples(_CANON_BYTES, _CANON_BYTES), max_size=5),
    body=_CANON_BYTES,
)
def test_relaxed_canonicalisation_is_dkimpys_byte_for_byte(
    headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """The signer's skip-when-nothing-to-change canonicaliser gives what dkimpy's does,
    which every verifier's view of our signatures rests on."""
    expected = [[name, value] for name, value in DkimpyRelaxed.canonicalize_headers(headers)]
    assert Relaxed.canonicalize_headers(headers) == expected
    assert Relaxed.canonicalize_body(body) == DkimpyRelaxed.canonicalize_body(body)


def _outcome(parse: object, message: bytes) -> object:
    try:
        return parse(message)  # type: ignore[operator]
    except (dkim.MessageFormatError, IndexError) as exc:
        return type(exc), str(exc)


# Messages as SMTP brings them (CRLF lines, a blank line, a body) and as it does not.
_MESSAGE_LINES = st.lists(
    st.sampled_from(
        [
            b"Subject: hi",
            b"From: a@b.test",
            b" folded",
            b"\tfolded",
            b"From mbox line",
            b"no colon",
            b"X-A:",
            b":empty name",
            b"",
            b"body line ",
            b"\r",
            b"\xff:x",
        ]
    ),
    max_size=12,
)


@settings(max_examples=1000, deadline=None)
@given(
    crlf=_MESSAGE_LINES.map(b"\r\n".join),
    raw=_CANON_BYTES,
    tail=st.sampled_from([b"", b"\r\n", b"\n", b"\r\n\r\n"]),
)
def test_message_parsing_is_dkimpys_byte_for_byte(crlf: bytes, raw: bytes, tail: bytes) -> None:
    """The signer's and verifier's parser splits what SMTP brings without dkimpy's
    line-by-line join; on any bytes it must give dkimpy's fields, body and errors."""
    for message in (crlf + tail, raw, crlf + tail + raw):
        assert _outcome(rfc822_parse, message) == _outcome(dkim.rfc822_parse, message)


_NAMES = st.sampled_from([b"from", b"to", b"subject", b"date", b"x-a"])


@settings(max_examples=500, deadline=None)
@given(
    fields=st.lists(st.tuples(_NAMES, _CANON_BYTES), max_size=8),
    include=st.lists(_NAMES, max_size=10),
    signature=_CANON_BYTES,
)
def test_signed_field_digest_is_dkimpys(
    fields: list[tuple[bytes, bytes]], include: list[bytes], signature: bytes
) -> None:
    """Repeated names take the instances from the bottom up, missing ones (over-signing)
    add nothing, and the signature field goes last without its CRLF: as dkimpy hashes."""
    canonical = Relaxed.canonicalize_headers(fields)
    while b"b=" in signature:  # b= is empty when the signer hashes: only ours at the end
        signature = signature.replace(b"b=", b"")
    value = b" v=1; h=" + b":".join(include) + b"; " + signature + b"; b="
    expected = hashlib.sha256()
    dkim.hash_headers(expected, Relaxed, canonical, include, (b"DKIM-Signature", value), None)
    assert header_digest(canonical, include, value) == expected.digest()


def test_verification_canonicalises_with_the_checked_relaxed() -> None:
    """dkimpy's verifier picks c=relaxed from its table: it must get the canonicaliser
    the property test above holds to dkimpy's bytes, and still name it ``relaxed``."""
    policy = dkim.canonicalization.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    assert policy.header_algorithm is Relaxed and policy.body_algorithm is Relaxed
    assert policy.to_c_value() == b"relaxed/relaxed"
    assert dkim.canonicalization.Relaxed is DkimpyRelaxed  # the reference stays dkimpy's
