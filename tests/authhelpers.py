"""Shared pieces of the mail authentication tests: keys, DNS records, OpenDKIM as verifier.

OpenDKIM (Debian opendkim, 2.11: rsa-sha256 and ed25519-sha256) is the independent
implementation our signatures must satisfy. ``opendkim -t FILE`` verifies a message
file with the public keys given by ``TestPublicKeys``, so it needs no DNS at all.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from trio_mta.auth.keys import DkimKey, generate_pem, load_key, public_value

from .dnsserver import DnsServer

OPENDKIM = shutil.which("opendkim") or (
    "/usr/sbin/opendkim" if Path("/usr/sbin/opendkim").exists() else None
)


def unique_domain(tag: str = "d") -> str:
    """A fresh domain under .test: the session DNS server is shared by every test."""
    return f"{tag}{uuid.uuid4().hex[:10]}.test"


@dataclass(frozen=True)
class KeyPair:
    key: DkimKey

    @property
    def record(self) -> str:
        return f"v=DKIM1; k={self.key.algorithm}; p={public_value(self.key)}"

    @property
    def name(self) -> str:
        return f"{self.key.selector}._domainkey.{self.key.domain}"

    def publish(self, dns: DnsServer) -> None:
        """Add the TXT record, split into 255-octet strings as a zone file would."""
        value = self.record
        chunks = " ".join(f'"{value[i : i + 200]}"' for i in range(0, len(value), 200))
        dns.add(self.name + ".", "TXT", chunks)


def make_key(directory: Path, domain: str, selector: str, algorithm: str) -> KeyPair:
    path = directory / f"{domain}.{selector}.{algorithm}.key"
    if not path.exists():
        path.write_bytes(generate_pem(algorithm))  # type: ignore[arg-type]
    return KeyPair(load_key(path, domain, selector))


def opendkim_verify(message: bytes, keys: list[KeyPair], workdir: Path) -> list[str]:
    """OpenDKIM's verdict lines for *message* (one per signature it evaluated)."""
    assert OPENDKIM is not None
    workdir.mkdir(parents=True, exist_ok=True)
    pubkeys = workdir / "pubkeys"
    pubkeys.write_text("".join(f"{k.name} {k.record}\n" for k in keys))
    conf = workdir / "opendkim.conf"
    conf.write_text(f"TestPublicKeys {pubkeys}\nMode v\nSyslog no\n")
    msg = workdir / "message.eml"
    msg.write_bytes(message)
    done = subprocess.run(
        [OPENDKIM, "-x", str(conf), "-t", str(msg)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "verification" in line]
    assert lines, f"opendkim said nothing useful: {done.stdout!r} {done.stderr!r}"
    return lines
