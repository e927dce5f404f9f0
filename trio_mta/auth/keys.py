"""DKIM keys: load a PEM private key, generate one, and print its DNS TXT record.

Keys are PEM (PKCS#8 or the traditional RSA form), as ``openssl genpkey`` and
``opendkim-genkey`` write them, so keys move freely between trio_mta and other
signers. Only RSA of at least 1024 bits (RFC 8301 §3.2; 2048 generated) and
Ed25519 (RFC 8463) sign.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

__all__ = [
    "Algorithm",
    "DkimKey",
    "DkimKeyError",
    "generate_pem",
    "load_key",
    "public_value",
    "txt_record",
    "write_private",
]

Algorithm = Literal["rsa", "ed25519"]
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: verifiers MUST NOT consider shorter keys valid
GENERATED_RSA_BITS = 2048


class DkimKeyError(ValueError):
    """A key file that cannot sign; the message says why (completes "KEY: ")."""


@dataclass(frozen=True)
class DkimKey:
    """One ``[[dkim.sign]]`` entry with its key loaded."""

    domain: str
    selector: str
    path: Path
    algorithm: Algorithm
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = field(repr=False, compare=False)

    @property
    def dkim_algorithm(self) -> bytes:
        """The ``a=`` tag value."""
        return b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"

    @property
    def bits(self) -> int:
        return self.private.key_size if isinstance(self.private, rsa.RSAPrivateKey) else 256

    def describe(self) -> str:
        """``example.org selector s2026 (ed25519, /etc/dkim/x.key)`` for check-config."""
        kind = f"rsa {self.bits}" if self.algorithm == "rsa" else "ed25519"
        return f"{self.domain} selector {self.selector} ({kind}, {self.path})"


def load_key(path: Path, domain: str, selector: str) -> DkimKey:
    """Read and check *path*; raises :class:`DkimKeyError` naming the problem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise DkimKeyError(f"{path} is encrypted; DKIM keys must be unencrypted PEM") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DkimKeyError(f"{path} is not a PEM private key ({exc})") from None
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise DkimKeyError(
                f"{path}: RSA key of {private.key_size} bits; "
                f"at least {MIN_RSA_BITS} (RFC 8301), 2048 recommended"
            )
        return DkimKey(domain, selector, path, "rsa", private)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return DkimKey(domain, selector, path, "ed25519", private)
    raise DkimKeyError(
        f"{path}: {type(private).__name__} keys cannot sign DKIM; use RSA or Ed25519"
    )


def generate_pem(algorithm: Algorithm) -> bytes:
    """A new private key in PKCS#8 PEM."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=GENERATED_RSA_BITS)
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, pem: bytes) -> None:
    """Create *path* mode 0600 (never briefly world-readable); refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
        out.flush()
        os.fsync(out.fileno())


def public_value(key: DkimKey) -> str:
    """The ``p=`` tag: base64 of SubjectPublicKeyInfo (RSA, RFC 6376 §3.6.1) or of the raw
    32-byte public key (Ed25519, RFC 8463 §4.2)."""
    public = key.private.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return base64.b64encode(raw).decode("ascii")


def txt_record(key: DkimKey) -> str:
    """The zone-file line to publish: ``SEL._domainkey.DOMAIN. IN TXT "v=DKIM1; k=…; p=…"``.

    An RSA 2048 value is longer than one 255-octet TXT string, so it is split into
    several quoted strings, which DNS joins (RFC 6376 §3.6.2.2).
    """
    value = f"v=DKIM1; k={key.algorithm}; p={public_value(key)}"
    chunks = [value[i : i + 250] for i in range(0, len(value), 250)]
    quoted = " ".join(f'"{chunk}"' for chunk in chunks)
    return f"{key.selector}._domainkey.{key.domain}. IN TXT {quoted}"
