"""``trio-mta dkim keygen`` and the ``[[dkim.sign]]`` / ``[verify]`` configuration."""

from __future__ import annotations

import base64
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from trio_mta.config import Config, ConfigError

from .proc import run_cli


@pytest.mark.parametrize(("algorithm", "k"), [("rsa", "rsa"), ("ed25519", "ed25519")])
def test_keygen_writes_a_private_key_and_prints_its_record(
    tmp_path: Path, algorithm: str, k: str
) -> None:
    out = tmp_path / "key.pem"
    done = run_cli(
        "dkim", "keygen", "Example.ORG", "s2026", "--algorithm", algorithm, "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    private = serialization.load_pem_private_key(out.read_bytes(), password=None)
    match = re.fullmatch(
        r's2026\._domainkey\.example\.org\. IN TXT ((?:"[^"]*" ?)+)\n', done.stdout
    )
    assert match, done.stdout
    value = "".join(re.findall(r'"([^"]*)"', match.group(1)))
    assert all(len(part) <= 255 for part in re.findall(r'"([^"]*)"', match.group(1)))
    assert value.startswith(f"v=DKIM1; k={k}; p=")
    published = base64.b64decode(value.split("p=", 1)[1])
    if algorithm == "rsa":
        assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
        assert published == private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        assert isinstance(private, ed25519.Ed25519PrivateKey)
        assert published == private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    assert "[[dkim.sign]]" in done.stderr and 'domain = "example.org"' in done.stderr


def test_keygen_never_overwrites_and_checks_its_arguments(tmp_path: Path) -> None:
    out = tmp_path / "key.pem"
    out.write_text("an existing key")
    done = run_cli("dkim", "keygen", "example.org", "s1", "--out", str(out))
    assert done.returncode == 1 and "already exists" in done.stderr
    assert out.read_text() == "an existing key"
    assert (
        run_cli("dkim", "keygen", "not a domain", "s1", "--out", str(tmp_path / "x")).returncode
        == 2
    )
    assert (
        run_cli(
            "dkim", "keygen", "example.org", "bad selector!", "--out", str(tmp_path / "y")
        ).returncode
        == 2
    )
    assert run_cli("dkim", "keygen", "example.org", "s1", "--algorithm", "dsa").returncode == 2


def test_check_config_names_each_key_and_rejects_one_that_does_not_load(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    assert (
        run_cli(
            "dkim", "keygen", "example.org", "e1", "--algorithm", "ed25519", "--out", str(key)
        ).returncode
        == 0
    )
    (tmp_path / "garbage.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n")
    good = (
        f'[[dkim.sign]]\ndomain = "example.org"\nselector = "e1"\nkey = "{key}"\n'
        "[verify]\ndmarc_enforce = true\n"
    )
    config = tmp_path / "good.toml"
    config.write_text(good)
    done = run_cli("check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"dkim: signs example.org selector e1 (ed25519, {key})" in done.stdout
    assert "verify: spf, dkim, dmarc (enforcing dmarc)" in done.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(
        good + '[[dkim.sign]]\ndomain = "example.org"\nselector = "r1"\n'
        'key = "garbage.pem"\n[[dkim.sign]]\ndomain = "example.org"\n'
        'selector = "r2"\nkey = "missing.pem"\n'
    )
    done = run_cli("check-config", "--config", str(bad))
    assert done.returncode == 2
    assert "[[dkim.sign]][2].key: " in done.stderr and "not a PEM private key" in done.stderr
    assert "[[dkim.sign]][3].key: cannot read " in done.stderr
    assert "Traceback" not in done.stderr


def test_dkim_and_verify_tables_are_checked_key_by_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping(
            {
                "dkim": {
                    "sign": [
                        {"domain": "example.org", "selector": "s1", "key": "k", "algorithm": "rsa"},
                        {"selector": "s2"},
                    ],
                    "other": 1,
                },
                "verify": {
                    "spf": "yes",
                    "spf_enforce": True,
                    "dmarc": False,
                    "dmarc_enforce": True,
                    "dkimm": True,
                },
            },
            base_dir=tmp_path,
        )
    errors = caught.value.errors
    assert "unknown key [[dkim.sign]][1].algorithm" in errors
    assert "[[dkim.sign]][2].domain: missing" in errors
    assert "[[dkim.sign]][2].key: missing" in errors
    assert "unknown key [dkim].other" in errors
    assert '[verify].spf: must be true or false, got "yes"' in errors
    assert "[verify].dmarc_enforce: needs [verify].dmarc = true" in errors
    assert any(e.startswith("unknown key [verify].dkimm") for e in errors)
    defaults = Config.from_mapping({}, base_dir=tmp_path).verify
    assert (defaults.spf, defaults.dkim, defaults.dmarc) == (True, True, True)
    assert not defaults.spf_enforce and not defaults.dmarc_enforce
