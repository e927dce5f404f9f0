"""The sans-IO halves of MTA-STS (RFC 8461 §3) and DANE (RFC 7672, RFC 6698), fed text and
real certificates (trustme), no network."""

from __future__ import annotations

import datetime

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from tests.policy_peers import ca_cert, leaf_of, tlsa
from trio_mta.tlspolicy.dane import TlsaRecord, match_chain, unusable_reason
from trio_mta.tlspolicy.sts import (
    StsError,
    StsPolicy,
    choose_txt,
    mx_matches,
    parse_policy,
    parse_txt,
)

# --- MTA-STS TXT record -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
        ("v=STSv1;id=abc", "abc"),
        ("v=STSv1; id=abc; ext=whatever", "abc"),
    ],
)
def test_txt_record_id(text: str, expected: str) -> None:
    assert parse_txt([text]).id == expected


def test_txt_record_strings_are_concatenated() -> None:
    assert parse_txt(["v=STSv1; i", "d=split"]).id == "split"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("id=abc; v=STSv1", "does not start with v=STSv1"),
        ("v=STSv1", "no id field"),
        ("v=STSv1; id=has-dash", "1-32 letters and digits"),
        ("v=STSv1; id=" + "a" * 33, "1-32 letters and digits"),
        ("v=STSv1; id=a; id=b", "two id fields"),
        ("v=STSv1; garbage", "not key=value"),
    ],
)
def test_bad_txt_records_say_why(text: str, reason: str) -> None:
    with pytest.raises(StsError, match=reason):
        parse_txt([text])


def test_unrelated_txt_records_are_ignored_and_two_sts_records_are_an_error() -> None:
    assert choose_txt([("v=spf1 -all",)]) is None
    assert choose_txt([("v=spf1 -all",), ("v=STSv1; id=1",)]) == parse_txt(["v=STSv1; id=1"])
    with pytest.raises(StsError, match="2 v=STSv1 TXT records"):
        choose_txt([("v=STSv1; id=1",), ("v=STSv1; id=2",)])


def test_records_that_do_not_begin_with_sts_v1_and_a_semicolon_are_discarded() -> None:
    """RFC 8461 §3.1 (found with fuzz_mtasts): v=STSv10 is not a second STSv1 record."""
    record = parse_txt(["v=STSv1; id=1"])
    assert choose_txt([("v=STSv10; id=2",), ("v=STSv1; id=1",)]) == record
    assert choose_txt([("v=STSv1x",), ("v=STSv1",), ("v=STSv1 ; id=1",)]) == record
    assert choose_txt([("v=STSv1",)]) is None


# --- the policy file ----------------------------------------------------------------------


def test_policy_with_crlf_lf_and_extensions() -> None:
    text = (
        "version: STSv1\r\nmode: enforce\nmx: MX1.Example.org.\r\nmx: *.example.net\n"
        "max_age: 604800\r\nfuture: thing\n"
    )
    assert parse_policy(text) == StsPolicy("enforce", 604800, ("mx1.example.org", "*.example.net"))


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mx == ()


@pytest.mark.parametrize(
    "text, reason",
    [
        ("mode: enforce\nmx: a.b\nmax_age: 1\n", "no 'version: STSv1'"),
        ("version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n", "version must be STSv1"),
        ("version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n", "mode must be enforce, testing"),
        ("version: STSv1\nmx: a.b\nmax_age: 1\n", "no mode"),
        ("version: STSv1\nmode: enforce\nmx: a.b\n", "no max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 31557601\n", "max_age must be"),
        ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n", "max_age must be"),
        ("version: STSv1\nmode: testing\nmax_age: 1\n", "mode testing has no mx"),
        ("version: STSv1\nmode: enforce\nmx: a.*.b\nmax_age: 1\n", "line 3: mx must be"),
        ("version: STSv1\nmode: enforce\nmode: none\nmx: a.b\nmax_age: 1\n", "mode given twice"),
        ("version: STSv1\nthis line has no colon\n", "line 2 is not 'key: value'"),
        ("version: STSv1\nmode: enforce\nmx: a.b..\nmax_age: 1\n", "line 3: mx must be"),
        ("version: STSv1\nmode: enforce\nmx: \u212a.b\nmax_age: 1\n", "line 3: mx must be"),
    ],
)
def test_bad_policies_say_why(text: str, reason: str) -> None:
    with pytest.raises(StsError, match=reason):
        parse_policy(text)


@pytest.mark.parametrize(
    "pattern, host, expected",
    [
        ("mx1.example.org", "MX1.example.org.", True),
        ("mx1.example.org", "mx2.example.org", False),
        ("*.example.org", "mx1.example.org", True),
        ("*.example.org", "a.mx1.example.org", False),  # one label only (RFC 8461 §4.1)
        ("*.example.org", "example.org", False),
        ("*.example.org", "mx1.example.org.evil.test", False),
        # Found against fuzz_mtasts's reference: one final dot is the root, two are an
        # empty label; and only ASCII letters fold (RFC 4343), not U+212A KELVIN SIGN.
        ("mx1.example.org", "mx1.example.org..", False),
        ("*.example.org", "mx1.example.org..", False),
        ("k.example.org", "\u212a.example.org", False),
        ("*.example.org", "MX1.EXAMPLE.ORG.", True),
    ],
)
def test_mx_patterns(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


_POLICY_WORDS = st.sampled_from(
    [
        "version",
        "mode",
        "mx",
        "max_age",
        "STSv1",
        "enforce",
        "testing",
        "none",
        ":",
        " ",
        "\r\n",
        "\n",
        "*.",
        ".",
        "a",
        "86400",
        "-1",
        "\x00",
        "é",
    ]
)


@given(st.lists(_POLICY_WORDS, max_size=40).map("".join) | st.text(max_size=200))
def test_any_policy_text_parses_or_says_why(text: str) -> None:
    try:
        policy = parse_policy(text)
    except StsError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert policy.mode in ("enforce", "testing", "none")


@given(st.text(max_size=120))
def test_any_txt_record_parses_or_says_why(text: str) -> None:
    try:
        parse_txt([text])
    except StsError as exc:
        assert str(exc)


# --- DANE -------------------------------------------------------------------------------


def record(text: str) -> TlsaRecord:
    usage, selector, mtype, data = text.split()
    return TlsaRecord(int(usage), int(selector), int(mtype), bytes.fromhex(data))


def der_chain(cert: trustme.LeafCert) -> tuple[bytes, ...]:
    from cryptography import x509

    return tuple(
        x509.load_pem_x509_certificate(pem.bytes()).public_bytes(serialization.Encoding.DER)
        for pem in cert.cert_chain_pems
    )


@pytest.mark.parametrize("selector, mtype", [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_dane_ee_matches_the_leaf_by_every_selector_and_matching_type(
    selector: int, mtype: int
) -> None:
    cert = trustme.CA().issue_cert("some-other-name.test")  # DANE-EE: names are not checked
    records = [record(tlsa(3, selector, mtype, leaf_of(cert)))]
    assert match_chain(records, der_chain(cert), names=["mx1.remote.test"]) is None


def test_dane_ee_ignores_expiry() -> None:
    """RFC 7672 §3.1.1: a DANE-EE match is the key, not the certificate's dates."""
    cert = trustme.CA().issue_cert("mx1.remote.test", not_after=datetime.datetime(2001, 1, 1))
    records = [record(tlsa(3, 1, 1, leaf_of(cert)))]
    assert match_chain(records, der_chain(cert), names=["mx1.remote.test"]) is None


def test_dane_ee_mismatch_says_so() -> None:
    cert = trustme.CA().issue_cert("mx1.remote.test")
    other = trustme.CA().issue_cert("mx1.remote.test")
    records = [record(tlsa(3, 1, 1, leaf_of(other)))]
    problem = match_chain(records, der_chain(cert), names=["mx1.remote.test"])
    assert problem is not None and "matches none of 1 usable TLSA records" in problem


def test_dane_ta_matches_an_issuer_in_the_chain_and_checks_the_name() -> None:
    root = trustme.CA()
    issuer = root.create_child_ca()
    cert = issuer.issue_cert("mx1.remote.test")
    records = [record(tlsa(2, 0, 1, ca_cert(issuer)))]
    assert match_chain(records, der_chain(cert), names=["mx1.remote.test"]) is None
    problem = match_chain(records, der_chain(cert), names=["mx2.remote.test"])
    assert problem is not None and problem.startswith("DANE-TA trust anchor matched")
    assert "subjectAltName" in problem


def test_dane_ta_accepts_the_next_hop_domain_as_the_name() -> None:
    """RFC 7672 §3.2.2: the MX host name or the destination domain."""
    issuer = trustme.CA().create_child_ca()  # an intermediate: the server sends it
    cert = issuer.issue_cert("remote.test")
    records = [record(tlsa(2, 1, 2, ca_cert(issuer)))]
    assert match_chain(records, der_chain(cert), names=["mx1.remote.test", "remote.test"]) is None


def test_dane_ta_full_certificate_in_dns_need_not_be_sent() -> None:
    """``2 0 0``: the record holds the trust anchor itself; the server sends only its leaf."""
    root = trustme.CA()
    cert = root.issue_cert("mx1.remote.test")
    records = [record(tlsa(2, 0, 0, ca_cert(root)))]
    assert match_chain(records, der_chain(cert)[:1], names=["mx1.remote.test"]) is None
    hashed = [record(tlsa(2, 0, 1, ca_cert(root)))]  # a digest cannot stand in for the CA
    assert match_chain(hashed, der_chain(cert)[:1], names=["mx1.remote.test"]) is not None


def test_dane_ta_from_another_ca_does_not_match() -> None:
    cert = trustme.CA().issue_cert("mx1.remote.test")
    records = [record(tlsa(2, 1, 1, ca_cert(trustme.CA())))]
    assert match_chain(records, der_chain(cert), names=["mx1.remote.test"]) is not None


@pytest.mark.parametrize(
    "text, reason",
    [
        ("0 0 1 " + "00" * 32, "PKIX-TA is not used for SMTP"),
        ("1 1 1 " + "00" * 32, "PKIX-EE is not used for SMTP"),
        ("4 1 1 " + "00" * 32, "usage 4 is not used"),
        ("3 2 1 " + "00" * 32, "unknown selector 2"),
        ("3 1 3 " + "00" * 32, "unknown matching type 3"),
        ("3 1 1 " + "00" * 20, "digest is 20 octets, not 32"),
        ("3 1 2 " + "00" * 32, "digest is 32 octets, not 64"),
    ],
)
def test_unusable_tlsa_records(text: str, reason: str) -> None:
    found = unusable_reason(record(text))
    assert found is not None and reason in found


def test_pkix_usages_never_match_even_when_their_digest_does() -> None:
    cert = trustme.CA().issue_cert("mx1.remote.test")
    records = [record(tlsa(1, 1, 1, leaf_of(cert)))]
    assert (
        match_chain(records, der_chain(cert), names=["mx1.remote.test"]) == "no usable TLSA records"
    )
