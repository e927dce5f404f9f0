"""Shared fixtures: a real server on 127.0.0.1 port 0 with trustme certificates."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from trio_mta.config import Config
from trio_mta.mta import MTA, serve

from .dnsserver import DnsServer

HOSTNAME = "mx.example.test"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DnsServer]:
    """The only name server tests may use: nothing ever reaches the machine's resolver.

    remote.test and elsewhere.test answer SERVFAIL, so mail relayed there by
    tests that are not about delivery stays deferred in the queue.
    """
    server = DnsServer()
    server.servfail("remote.test.")
    server.servfail("elsewhere.test.")
    with server:
        yield server


@pytest.fixture
def tls_files(tmp_path: Path, ca: trustme.CA) -> tuple[Path, Path, Path]:
    """(cert chain, key, CA bundle) for HOSTNAME and 127.0.0.1."""
    cert = ca.issue_cert(HOSTNAME, "localhost", "127.0.0.1", "::1")
    certs = tmp_path / "tls"
    certs.mkdir()
    chain = certs / "fullchain.pem"
    key = certs / "privkey.pem"
    bundle = certs / "ca.pem"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(str(bundle))
    return chain, key, bundle


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def make_config(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], dns_server: DnsServer
) -> Callable[..., Config]:
    """Build a test Config: port-0 listeners of every mode, domain example.test."""
    chain, key, _ = tls_files

    def make(**sections: Any) -> Config:
        data: dict[str, Any] = {
            "hostname": HOSTNAME,
            "state_dir": str(tmp_path / "state"),
            "listen": [
                {"address": "127.0.0.1:0", "mode": "smtp"},
                {"address": "127.0.0.1:0", "mode": "submission"},
                {"address": "127.0.0.1:0", "mode": "smtps"},
            ],
            "tls": {"cert": str(chain), "key": str(key)},
            "local": {"domains": ["example.test"]},
            "queue": {"retry_initial": "1s", "retry_max": "5s"},
            "dns": {"nameservers": ["{}:{}".format(*dns_server.address)], "timeout": "2s"},
        }
        return Config.from_mapping(_merge(data, sections), base_dir=tmp_path)

    return make


@pytest.fixture
async def mta(nursery: trio.Nursery, make_config: Callable[..., Config]) -> AsyncIterator[MTA]:
    server: MTA = await nursery.start(serve, make_config())
    yield server
