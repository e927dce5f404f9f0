"""DANE for SMTP (RFC 7672 on RFC 6698/7671) without I/O: which TLSA records count, and
whether a server's certificate chain matches them.

Usable for SMTP are DANE-TA(2) and DANE-EE(3) with selector Cert(0) or SPKI(1) and
matching type Full(0), SHA2-256(1) or SHA2-512(2); PKIX-TA(0)/PKIX-EE(1) and anything
unknown or malformed are unusable and ignored (RFC 7672 §3.1.3, RFC 7671 §4).

- DANE-EE matches the leaf alone; names and dates are not checked (RFC 7672 §3.1.1).
- DANE-TA matches a certificate of the chain the server sent (or, for ``2 0 0``,
  the certificate in the record itself), and then the leaf must chain to that
  trust anchor, be valid now, and name the MX host or the next-hop domain
  (RFC 7672 §3.1.2, §3.2.2). That chain check uses ``cryptography``'s X.509
  verifier with the matched certificate as the only anchor.

The chain comes from :func:`trio_mta.tls.peer_chain`; where Python cannot give more
than the leaf, DANE-TA finds no issuer to match and the host fails closed.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

__all__ = ["TlsaRecord", "match_chain", "unusable_reason", "verify_with_anchors"]

DANE_TA: Final = 2
DANE_EE: Final = 3
_DIGEST_SIZES: Final = {1: 32, 2: 64}  # SHA2-256, SHA2-512
_NAMES: Final = {0: "PKIX-TA", 1: "PKIX-EE", 2: "DANE-TA", 3: "DANE-EE"}


@dataclass(frozen=True)
class TlsaRecord:
    """One TLSA record: usage, selector, matching type and the association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}..."

    @property
    def usable(self) -> bool:
        return unusable_reason(self) is None


def unusable_reason(record: TlsaRecord) -> str | None:
    """Why an SMTP client must ignore *record*, or None when it is usable."""
    if record.usage not in (DANE_TA, DANE_EE):
        name = _NAMES.get(record.usage, f"usage {record.usage}")
        return f"{name} is not used for SMTP (RFC 7672 §3.1.3)"
    if record.selector not in (0, 1):
        return f"unknown selector {record.selector}"
    if record.mtype not in (0, 1, 2):
        return f"unknown matching type {record.mtype}"
    size = _DIGEST_SIZES.get(record.mtype)
    if size is not None and len(record.data) != size:
        return f"digest is {len(record.data)} octets, not {size} (RFC 7671 §4)"
    if record.mtype == 0 and not record.data:
        return "empty association data"
    return None


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _associated(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def _matches(record: TlsaRecord, cert: x509.Certificate) -> bool:
    return _associated(_selected(cert, record.selector), record.mtype) == record.data


def match_chain(
    records: Iterable[TlsaRecord],
    chain: Sequence[bytes],
    *,
    names: Sequence[str],
    now: datetime.datetime | None = None,
) -> str | None:
    """None when *chain* (DER, leaf first) satisfies one usable record, else the reason.

    *names* are the reference identifiers for DANE-TA: the MX host, then the
    next-hop domain (RFC 7672 §3.2.2).
    """
    usable = [r for r in records if r.usable]
    if not usable:
        return "no usable TLSA records"
    if not chain:
        return "the server sent no certificate"
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        return "the server's certificate cannot be parsed"
    leaf = certs[0]
    if any(r.usage == DANE_EE and _matches(r, leaf) for r in usable):
        return None
    anchors = [
        cert for cert in certs if any(r.usage == DANE_TA and _matches(r, cert) for r in usable)
    ]
    for r in usable:
        if r.usage == DANE_TA and r.selector == 0 and r.mtype == 0:
            try:
                anchors.append(x509.load_der_x509_certificate(r.data))
            except ValueError:
                continue
    if not anchors:
        have = "leaf and chain" if len(certs) > 1 else "leaf (no chain sent)"
        return f"certificate matches none of {len(usable)} usable TLSA records ({have} checked)"
    problem = verify_with_anchors(leaf, certs[1:], anchors, names=names, now=now)
    if problem is None:
        return None
    return f"DANE-TA trust anchor matched, but the chain does not verify: {problem}"


def verify_with_anchors(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    *,
    names: Sequence[str],
    now: datetime.datetime | None = None,
) -> str | None:
    """None when *leaf* chains to one of *anchors* and names one of *names*; else why not.

    The leaf profile is relaxed to "has a subjectAltName" (private CAs behind
    DANE-TA rarely follow the Web PKI baseline to the letter); CA certificates
    keep ``cryptography``'s default checks.
    """
    store = Store(list(anchors))
    leaf_policy = ExtensionPolicy.permit_all().require_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    last = "no reference name"
    for name in names:
        builder = (
            PolicyBuilder()
            .store(store)
            .extension_policies(
                ee_policy=leaf_policy, ca_policy=ExtensionPolicy.webpki_defaults_ca()
            )
        )
        if now is not None:
            builder = builder.time(now)
        try:
            verifier = builder.build_server_verifier(x509.DNSName(name))
            verifier.verify(leaf, list(intermediates))
        except (VerificationError, ValueError) as exc:
            last = str(exc).removeprefix("validation failed: ")
            continue
        return None
    return last
