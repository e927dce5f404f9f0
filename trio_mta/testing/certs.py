"""A throwaway certificate authority and server certificate for test servers.

Generated once per process (two P-256 keys: about a millisecond) and kept in
memory, so every capture server offers STARTTLS without touching the disk
more than writing three small files into its own temporary folder. Clients
verify against the CA (``cafile``/``ssl_context``), as they would in
production, instead of switching verification off.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import secrets
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TestCertificates", "client_context", "test_certificates"]

# The names a test client may use to reach a loopback server.
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
_VALID = datetime.timedelta(days=30)
_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class TestCertificates:
    """PEM blobs: the CA certificate, and the server's chain and key."""

    __test__ = False  # not a pytest test class despite the name

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@functools.cache
def test_certificates() -> TestCertificates:
    """The process-wide CA and ``localhost``/``127.0.0.1``/``::1`` server certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("trio_mta.testing CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(secrets.randbits(127) + 1)
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(SERVER_NAMES[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(127) + 1)
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALID)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in SERVER_NAMES]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return TestCertificates(
        ca_pem=ca_cert.public_bytes(pem),
        cert_pem=cert.public_bytes(pem),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def client_context() -> ssl.SSLContext:
    """A verifying client context that trusts only the test CA (host names checked)."""
    ctx = ssl.create_default_context(cadata=test_certificates().ca_pem.decode("ascii"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
