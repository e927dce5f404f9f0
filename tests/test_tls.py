"""trio_mta.tls: certificate generation, context policy, real handshakes on loopback."""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
import stat
import warnings
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trio_mta.tls import (
    TLSConfigError,
    client_context,
    describe,
    ensure_certificate,
    server_context,
)

HOST = "mx.example.test"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def write_pair(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*names)
    directory.mkdir(exist_ok=True)
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


async def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None
) -> tuple[str, BaseException | None, BaseException | None, object]:
    """Run one TLS handshake over real TCP on 127.0.0.1.

    Returns (description or "", server error, client error, client compression).
    Errors are the ssl-level causes trio wraps in BrokenResourceError.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    errors: dict[str, BaseException | None] = {"server": None, "client": None}
    result: list[object] = ["", None]

    async def server() -> None:
        stream = await listeners[0].accept()
        tls_stream = trio.SSLStream(stream, server_ctx, server_side=True)
        try:
            await tls_stream.do_handshake()
            await tls_stream.send_all(b"ok")
        except trio.BrokenResourceError as exc:
            errors["server"] = exc.__cause__ or exc
        finally:
            await trio.aclose_forcefully(tls_stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            tls_stream = trio.SSLStream(stream, client_ctx, server_hostname=server_hostname)
            try:
                await tls_stream.do_handshake()
                assert await tls_stream.receive_some(10) == b"ok"
                result[:] = [describe(tls_stream), tls_stream.compression()]
            except trio.BrokenResourceError as exc:
                errors["client"] = exc.__cause__ or exc
            finally:
                await trio.aclose_forcefully(tls_stream)
        for listener in listeners:
            await listener.aclose()
    return str(result[0]), errors["server"], errors["client"], result[1]


# --------------------------------------------------------------------- generation


def test_generated_pair_is_reused(tmp_path: Path) -> None:
    cert, key = ensure_certificate(None, None, hostname=HOST, state_dir=tmp_path)
    assert (cert, key) == (tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem")
    first = cert.read_bytes(), key.read_bytes()
    again = ensure_certificate(None, None, hostname=HOST, state_dir=tmp_path)
    assert again == (cert, key)
    assert (cert.read_bytes(), key.read_bytes()) == first
    assert not [p for p in cert.parent.iterdir() if p.name.endswith(".tmp")]


def test_generated_key_is_private_and_cert_matches(tmp_path: Path) -> None:
    cert_path, key_path = ensure_certificate(None, None, hostname=HOST, state_dir=tmp_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=729) < lifetime < datetime.timedelta(days=732)


def test_generated_pair_for_ip_literal_uses_ip_san(tmp_path: Path) -> None:
    cert_path, _ = ensure_certificate(None, None, hostname="127.0.0.1", state_dir=tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_generated_pair_replaced_when_hostname_changes(tmp_path: Path) -> None:
    cert, _ = ensure_certificate(None, None, hostname=HOST, state_dir=tmp_path)
    old = cert.read_bytes()
    ensure_certificate(None, None, hostname="other.example.test", state_dir=tmp_path)
    new = x509.load_pem_x509_certificate(cert.read_bytes())
    assert cert.read_bytes() != old
    san = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["other.example.test"]


def test_torn_pair_is_regenerated(tmp_path: Path) -> None:
    """A crash between the key and the cert rename leaves a mismatch; the next start fixes it."""
    cert, key = ensure_certificate(None, None, hostname=HOST, state_dir=tmp_path)
    other = tmp_path / "other"
    _, other_key = ensure_certificate(None, None, hostname=HOST, state_dir=other)
    key.write_bytes(other_key.read_bytes())
    ensure_certificate(None, None, hostname=HOST, state_dir=tmp_path)
    server_context(cert, key)  # raises TLSConfigError on a mismatched pair


def test_configured_pair_returned_unchanged(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    assert ensure_certificate(cert, key, hostname=HOST, state_dir=tmp_path) == (cert, key)
    assert not (tmp_path / "tls").exists()


def test_only_one_of_the_pair_names_the_missing_key(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match=r"^\[tls\]\.key: ") as info:
        ensure_certificate(tmp_path / "c.pem", None, hostname=HOST, state_dir=tmp_path)
    assert info.value.key == "[tls].key"
    with pytest.raises(TLSConfigError, match=r"^\[tls\]\.cert: "):
        ensure_certificate(None, tmp_path / "k.pem", hostname=HOST, state_dir=tmp_path)


def test_unwritable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TLSConfigError, match=r"^state_dir: cannot write"):
        ensure_certificate(None, None, hostname=HOST, state_dir=blocker)


# ------------------------------------------------------------- server_context errors


def test_mismatched_cert_and_key_names_the_key(tmp_path: Path, ca: trustme.CA) -> None:
    cert, _ = write_pair(ca, tmp_path / "a", HOST)
    _, other_key = write_pair(ca, tmp_path / "b", HOST)
    with pytest.raises(TLSConfigError) as info:
        server_context(cert, other_key)
    assert str(info.value).startswith("[tls].key: ")
    assert str(other_key) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_files_name_their_key(tmp_path: Path, ca: trustme.CA) -> None:
    cert, key = write_pair(ca, tmp_path, HOST)
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError) as info:
        server_context(missing, key)
    assert str(info.value) == f"[tls].cert: cannot read {missing}: No such file or directory"
    with pytest.raises(TLSConfigError) as info:
        server_context(cert, missing)
    assert str(info.value) == f"[tls].key: cannot read {missing}: No such file or directory"


def test_garbage_files_name_their_key(tmp_path: Path, ca: trustme.CA) -> None:
    cert, key = write_pair(ca, tmp_path, HOST)
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(TLSConfigError, match=r"^\[tls\]\.cert: no PEM certificate"):
        server_context(junk, key)
    with pytest.raises(TLSConfigError, match=r"^\[tls\]\.key: no usable PEM private key"):
        server_context(cert, junk)


def test_encrypted_key_is_refused_without_prompting(tmp_path: Path, ca: trustme.CA) -> None:
    cert, key = write_pair(ca, tmp_path, HOST)
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match=r"^\[tls\]\.key: .* is encrypted"):
        server_context(cert, key)


def test_server_context_policy(tmp_path: Path, ca: trustme.CA) -> None:
    ctx = server_context(*write_pair(ca, tmp_path, HOST))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    for flag in (
        ssl.OP_NO_COMPRESSION,
        ssl.OP_NO_RENEGOTIATION,
        ssl.OP_CIPHER_SERVER_PREFERENCE,
    ):
        assert ctx.options & flag
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for cipher in tls12:
        assert cipher["kea"] == "kx-ecdhe" and cipher["aead"], cipher["name"]


def test_bad_ca_file_names_its_key(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("hello\n")
    with pytest.raises(TLSConfigError, match=r"^\[relay\]\.ca_file: "):
        client_context("verify", ca_file=junk)
    with pytest.raises(TLSConfigError, match=r"^\[relay\]\.ca_file: cannot read"):
        client_context("verify", ca_file=tmp_path / "missing.pem")


def test_client_context_modes() -> None:
    for mode in ("opportunistic", "required"):
        ctx = client_context(mode, ca_file=None)
        assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    ctx = client_context("verify", ca_file=None)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


# ------------------------------------------------------------------ real handshakes


async def test_verified_handshake_with_ca_signed_cert(
    tmp_path: Path, ca: trustme.CA, ca_file: Path
) -> None:
    server_ctx = server_context(*write_pair(ca, tmp_path, HOST))
    client_ctx = client_context("verify", ca_file=ca_file)
    described, server_err, client_err, compression = await handshake(server_ctx, client_ctx, HOST)
    assert (server_err, client_err) == (None, None)
    assert re.fullmatch(r"TLSv1\.3 TLS_[A-Z0-9_]+", described)
    assert compression is None


async def test_verify_rejects_wrong_host_name(
    tmp_path: Path, ca: trustme.CA, ca_file: Path
) -> None:
    server_ctx = server_context(*write_pair(ca, tmp_path, HOST))
    client_ctx = client_context("verify", ca_file=ca_file)
    described, _, client_err, _ = await handshake(server_ctx, client_ctx, "wrong.example.test")
    assert described == ""
    assert isinstance(client_err, ssl.SSLCertVerificationError)
    assert "mismatch" in client_err.verify_message.lower()


async def test_verify_rejects_unknown_ca(tmp_path: Path, ca: trustme.CA) -> None:
    server_ctx = server_context(*write_pair(ca, tmp_path, HOST))
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    _, _, client_err, _ = await handshake(
        server_ctx, client_context("verify", ca_file=stranger), HOST
    )
    assert isinstance(client_err, ssl.SSLCertVerificationError)


async def test_opportunistic_accepts_any_certificate(tmp_path: Path) -> None:
    cert, key = ensure_certificate(None, None, hostname=HOST, state_dir=tmp_path)
    described, server_err, client_err, _ = await handshake(
        server_context(cert, key), client_context("opportunistic", ca_file=None), "x.invalid"
    )
    assert (server_err, client_err) == (None, None)
    assert described.startswith("TLSv1.3 ")


async def test_generated_cert_verifies_when_pinned(tmp_path: Path) -> None:
    cert, key = ensure_certificate(None, None, hostname=HOST, state_dir=tmp_path)
    described, _, client_err, _ = await handshake(
        server_context(cert, key), client_context("verify", ca_file=cert), HOST
    )
    assert client_err is None and described


async def test_generated_ip_cert_verifies_by_address(tmp_path: Path) -> None:
    cert, key = ensure_certificate(None, None, hostname="127.0.0.1", state_dir=tmp_path)
    described, _, client_err, _ = await handshake(
        server_context(cert, key), client_context("verify", ca_file=cert), "127.0.0.1"
    )
    assert client_err is None and described


def legacy_client(max_version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client willing to speak old TLS (OpenSSL 3 needs security level 0 for it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = max_version
    return ctx


async def test_tls11_client_is_refused(tmp_path: Path, ca: trustme.CA) -> None:
    server_ctx = server_context(*write_pair(ca, tmp_path, HOST))
    # Control: the same legacy-capable client completes TLS 1.2, so the refusal below
    # comes from the server's floor, not from a client that cannot speak at all.
    described, server_err, _, _ = await handshake(
        server_ctx, legacy_client(ssl.TLSVersion.TLSv1_2), None
    )
    assert server_err is None
    assert re.fullmatch(r"TLSv1\.2 ECDHE-(ECDSA|RSA)-[A-Z0-9-]+", described)

    described, server_err, client_err, _ = await handshake(
        server_ctx, legacy_client(ssl.TLSVersion.TLSv1_1), None
    )
    assert described == ""
    assert isinstance(server_err, ssl.SSLError)
    assert server_err.reason == "UNSUPPORTED_PROTOCOL"
    assert isinstance(client_err, ssl.SSLError)


async def test_tls12_client_gets_ecdhe_aead(tmp_path: Path, ca: trustme.CA) -> None:
    server_ctx = server_context(*write_pair(ca, tmp_path, HOST))
    client_ctx = legacy_client(ssl.TLSVersion.TLSv1_2)
    client_ctx.set_ciphers("AES256-SHA:ECDHE-RSA-AES256-SHA:ECDHE-ECDSA-AES256-SHA")
    _, server_err, _, _ = await handshake(server_ctx, client_ctx, None)
    assert isinstance(server_err, ssl.SSLError)  # no CBC/non-ECDHE suite is acceptable


# ------------------------------------------------------------------------ describe


def test_describe_before_handshake_is_an_error() -> None:
    ctx = client_context("opportunistic", ca_file=None)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    with pytest.raises(ValueError, match="handshake"):
        describe(obj)
