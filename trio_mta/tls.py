"""TLS material and contexts: the certificate pair, server and client ``ssl`` contexts.

Everything that can go wrong with operator-supplied files is reported as one
:class:`TLSConfigError` line naming the configuration key, so ``check-config``
and ``serve`` can print it and exit 2 instead of showing an OpenSSL traceback.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import ssl
from pathlib import Path
from typing import Literal, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trio_mta.safeio import replace_file

__all__ = [
    "ClientTLSMode",
    "TLSConfigError",
    "client_context",
    "describe",
    "ensure_certificate",
    "server_context",
]

ClientTLSMode = Literal["opportunistic", "required", "verify"]

CERT_KEY = "[tls].cert"
KEY_KEY = "[tls].key"
CA_FILE_KEY = "[relay].ca_file"
STATE_DIR_KEY = "state_dir"

# Two years, as the interface fixes; regenerated when less than this remains so a
# long-running install never serves an expired self-signed certificate after a restart.
_VALIDITY = datetime.timedelta(days=730)
_RENEW_BEFORE = datetime.timedelta(days=30)
# Backdating absorbs clock skew between us and the peer.
_BACKDATE = datetime.timedelta(hours=1)

# TLS 1.2 suites: forward secrecy (ECDHE) and AEAD only (RFC 7525 §4.2, RFC 9325 §4.2).
# TLS 1.3 suites are all AEAD with ephemeral key exchange and are left at OpenSSL's default.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TLSConfigError(Exception):
    """A TLS setting cannot be used; ``str()`` is one line naming the config key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _describe_oserror(exc: OSError) -> str:
    return exc.strerror or str(exc)


# ---------------------------------------------------------------------------
# certificate pair


def ensure_certificate(
    cert: Path | None, key: Path | None, *, hostname: str, state_dir: Path
) -> tuple[Path, Path]:
    """Return the certificate and key paths to serve, generating a self-signed pair if needed.

    With both paths configured they are returned unchanged (``server_context`` checks
    them). With neither, a pair for ``hostname`` lives in ``<state_dir>/tls/`` and is
    reused across starts, so clients that pinned it on first use keep working; it is
    regenerated only when unusable, for another host name, or about to expire.
    """
    if cert is not None and key is not None:
        return cert, key
    if cert is not None:
        raise TLSConfigError(KEY_KEY, f"must be set together with {CERT_KEY} ({cert})")
    if key is not None:
        raise TLSConfigError(CERT_KEY, f"must be set together with {KEY_KEY} ({key})")

    tls_dir = state_dir / "tls"
    cert_path, key_path = tls_dir / "cert.pem", tls_dir / "key.pem"
    if _generated_pair_usable(cert_path, key_path, hostname):
        return cert_path, key_path
    try:
        tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_pem, cert_pem = _self_signed_pem(hostname)
        # Key first: a crash between the two renames leaves a mismatched pair, which
        # _generated_pair_usable() detects and replaces on the next start.
        # replace_file sets the mode at creation, so the key is never briefly world-readable.
        replace_file(key_path, key_pem, mode=0o600)
        replace_file(cert_path, cert_pem, mode=0o644)
    except OSError as exc:
        where = exc.filename or tls_dir
        raise TLSConfigError(
            STATE_DIR_KEY,
            f"cannot write the generated certificate to {where}: {_describe_oserror(exc)}",
        ) from exc
    return cert_path, key_path


def _generated_pair_usable(cert_path: Path, key_path: Path, hostname: str) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        return False
    remaining = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    if remaining < _RENEW_BEFORE:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return _san_entry(hostname) in san


def _san_entry(hostname: str) -> x509.GeneralName:
    """An IP literal goes in an iPAddress entry: RFC 6125 §6.4.4 forbids matching
    it against dNSName, and OpenSSL's host check follows that."""
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def _self_signed_pem(hostname: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    # CN is limited to 64 characters (RFC 5280 ub-common-name); the SAN carries the
    # name that matters, so a longer host name simply gets an empty subject.
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, hostname)] if len(hostname) <= 64 else []
    )
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(127) + 1)
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        # RFC 5280 §4.2.1.6: the SAN must be critical when the subject is empty.
        .add_extension(x509.SubjectAlternativeName([_san_entry(hostname)]), critical=not subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    certificate = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------------------
# contexts


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for STARTTLS and smtps.

    The pair is checked with ``cryptography`` first so each failure names the key
    that is wrong; OpenSSL's own errors ("PEM lib") do not say which file.
    """
    _check_pair(cert, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # RFC 8996 deprecates TLS 1.0/1.1; RFC 9325 §3.1.1 requires 1.2 as the floor.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION  # CRIME (RFC 9325 §3.3)
        | ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a DoS lever
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE  # always on since OpenSSL 1.1 (value 0); stated for the reader
    )
    try:
        # An empty password keeps OpenSSL from prompting on the terminal should the
        # key file have been swapped for an encrypted one since _check_pair().
        ctx.load_cert_chain(cert, key, password=b"")
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(CERT_KEY, f"OpenSSL refused {cert} with {key}: {exc}") from exc
    return ctx


def _read(path: Path, config_key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(config_key, f"cannot read {path}: {_describe_oserror(exc)}") from exc


def _check_pair(cert_path: Path, key_path: Path) -> None:
    cert_pem = _read(cert_path, CERT_KEY)
    key_pem = _read(key_path, KEY_KEY)
    try:
        # A fullchain file lists the leaf first (RFC 8446 §4.4.2).
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise TLSConfigError(CERT_KEY, f"no PEM certificate in {cert_path}") from exc
    key: PrivateKeyTypes
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise TLSConfigError(
            KEY_KEY, f"{key_path} is encrypted; a passphrase-less key is required"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSConfigError(KEY_KEY, f"no usable PEM private key in {key_path}") from exc
    if _public_der(chain[0].public_key()) != _public_der(key.public_key()):
        raise TLSConfigError(KEY_KEY, f"{key_path} does not match the certificate in {cert_path}")


def client_context(mode: ClientTLSMode, *, ca_file: Path | None) -> ssl.SSLContext:
    """A client context for outbound STARTTLS and implicit TLS.

    ``opportunistic`` and ``required`` encrypt without authenticating the peer: MX
    certificates are rarely valid for the MX name, and RFC 7435 §1.3 prefers
    unauthenticated encryption over cleartext. ``verify`` authenticates with
    ``ca_file`` or the system trust store and checks the host name.
    """
    if mode == "verify":
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file is not None:
            _load_ca_file(ctx, ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    elif mode in ("opportunistic", "required"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        raise ValueError(f"unknown client TLS mode {mode!r}")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def _load_ca_file(ctx: ssl.SSLContext, ca_file: Path) -> None:
    data = _read(ca_file, CA_FILE_KEY)
    try:
        x509.load_pem_x509_certificates(data)
        ctx.load_verify_locations(cafile=ca_file)
    except (ValueError, ssl.SSLError, OSError) as exc:
        raise TLSConfigError(CA_FILE_KEY, f"no usable PEM certificate in {ca_file}") from exc


class _TLSInfo(Protocol):
    """What ``describe`` needs; ``ssl.SSLObject``, ``ssl.SSLSocket`` and
    ``trio.SSLStream`` (which forwards these methods) all provide it."""

    def version(self) -> str | None: ...

    def cipher(self) -> tuple[str, str, int] | None: ...


def describe(ssl_object: _TLSInfo) -> str:
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384"``: protocol and cipher for logs and the
    ``Received:`` header (RFC 5321 §4.4 leaves the comment format to us; this is
    what Postfix writes too)."""
    version = ssl_object.version()
    cipher = ssl_object.cipher()
    if version is None or cipher is None:
        raise ValueError("the TLS handshake has not completed")
    return f"{version} {cipher[0]}"
