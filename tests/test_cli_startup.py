"""What the command line says before any mail flows: --version, check-config, bad log files."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import trio_mta

from .proc import run_cli

BASE = """
hostname = "mx.cli.test"
state_dir = "state"
[[listen]]
address = "127.0.0.1:0"
mode = "smtp"
[local]
domains = ["cli.test"]
"""


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "mta.toml"
    path.write_text(body)
    return path


# -- --version (SPEC §13) ---------------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"trio-mta {trio_mta.__version__}\n"
    assert re.fullmatch(r"trio-mta \d+\.\d+\.\d+\n", result.stdout)
    # One source of truth: the installed metadata is read from trio_mta.__version__.
    assert importlib.metadata.version("trio-mta") == trio_mta.__version__


# -- [log].file / --log-file that cannot be written ---------------------------------------------


def assert_one_line_naming(result: subprocess.CompletedProcess[str], key: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"trio-mta: config: {key}: "), lines[0]
    return lines[0]


def test_log_file_that_is_a_directory_is_refused_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    config = write_config(tmp_path, BASE + '[log]\nfile = "logs"\n')
    checked = run_cli("check-config", "--config", str(config))
    line = assert_one_line_naming(checked, "[log].file")
    assert "is a directory" in line
    served = run_cli("serve", "--config", str(config))
    assert assert_one_line_naming(served, "[log].file") == line


def test_log_file_under_a_regular_file_is_refused_naming_the_key_or_flag(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a folder")
    config = write_config(tmp_path, BASE + '[log]\nfile = "plain/sub/mta.log"\n')
    line = assert_one_line_naming(run_cli("check-config", "--config", str(config)), "[log].file")
    assert f"{tmp_path / 'plain'} is not a directory" in line
    assert_one_line_naming(run_cli("serve", "--config", str(config)), "[log].file")
    flagged = run_cli(
        "serve",
        "--config",
        str(write_config(tmp_path, BASE)),
        "--log-file",
        str(tmp_path / "plain" / "mta.log"),
    )
    assert "is not a directory" in assert_one_line_naming(flagged, "--log-file")
    assert (tmp_path / "plain").read_text() == "not a folder"
    assert not (tmp_path / "state").exists()  # refused before anything was created


def test_good_log_file_is_created_with_its_folders(tmp_path: Path) -> None:
    config = write_config(tmp_path, BASE + '[log]\nfile = "var/log/mta.log"\n')
    checked = run_cli("check-config", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert not (tmp_path / "var").exists()  # check-config leaves nothing behind
    assert f"to {tmp_path / 'var' / 'log' / 'mta.log'}" in checked.stdout


def _read_only_bind(folder: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run *argv* with *folder* bind-mounted read-only, in a private mount namespace (root
    writes anything else), so nothing outside the test changes."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" || exit 99\nexec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(folder), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


def _cli_read_only(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _read_only_bind(folder, sys.executable, "-m", "trio_mta", *args)


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "old.log").write_text("")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a read-only bind mount")
    probe = _read_only_bind(folder, "sh", "-c", f"! touch {folder}/probe")
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()}")
    return folder


@pytest.mark.parametrize("name", ["old.log", "new/sub/mta.log"])
def test_log_file_on_a_read_only_filesystem_is_refused_naming_the_key(
    tmp_path: Path, read_only_folder: Path, name: str
) -> None:
    config = write_config(tmp_path, BASE + f'[log]\nfile = "ro/{name}"\n')
    for command in ("check-config", "serve"):
        line = assert_one_line_naming(
            _cli_read_only(read_only_folder, command, "--config", str(config)), "[log].file"
        )
        assert "read-only file system" in line
    flagged = _cli_read_only(
        read_only_folder,
        "serve",
        "--config",
        str(write_config(tmp_path, BASE)),
        "--log-file",
        str(read_only_folder / name),
    )
    assert "read-only file system" in assert_one_line_naming(flagged, "--log-file")


# -- what check-config shows ------------------------------------------------------------------


def test_check_config_shows_the_effective_configuration(tmp_path: Path) -> None:
    (tmp_path / "mailboxes").write_text("alice@cli.test alice\nbob@cli.test bob\n")
    config = write_config(
        tmp_path,
        BASE
        + """mailboxes_file = "mailboxes"
[local.aliases]
"all@cli.test" = ["alice@cli.test", "bob@cli.test"]
[relay]
trusted_networks = ["10.0.0.0/8", "2001:db8::/32"]
[dns]
nameservers = ["127.0.0.1:5353", "::1"]
""",
    )
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    state = tmp_path / "state"
    lines = result.stdout.splitlines()
    assert lines[0] == f"configuration ok ({config})"
    for expected in [
        "hostname: mx.cli.test",
        "listen: 127.0.0.1:0 smtp (STARTTLS)",
        "local domains: cli.test",
        f"mailboxes: 2 addresses mapped (file {tmp_path / 'mailboxes'})",
        "aliases: 1 alias",
        f"maildir root: {state / 'mail'}",
        f"state dir: {state} (queue {state / 'queue.sqlite3'})",
        "trusted networks: 10.0.0.0/8, 2001:db8::/32",
        f"tls: self-signed for mx.cli.test, generated in {state / 'tls'}",
        "dns: nameservers 127.0.0.1:5353, [::1]:53",
    ]:
        assert expected in lines, (expected, lines)


def test_check_config_names_configured_tls_files_and_the_system_resolver(
    tmp_path: Path, tls_pair: tuple[Path, Path]
) -> None:
    cert, key = tls_pair
    config = write_config(tmp_path, BASE + f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"tls: certificate {cert}, key {key}" in result.stdout.splitlines()
    assert "dns: the system resolver (/etc/resolv.conf)" in result.stdout.splitlines()
    assert "mailboxes: every local part is a mailbox (no map)" in result.stdout.splitlines()


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[Path, Path]:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("mx.cli.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


WILDCARD = BASE.replace("127.0.0.1:0", "0.0.0.0:0")


@pytest.mark.parametrize("everyone", ["0.0.0.0/0", "::/0", "0.0.0.0/0, ::/0"])
def test_check_config_warns_when_the_whole_internet_may_relay(
    tmp_path: Path, everyone: str
) -> None:
    networks = ", ".join(f'"{net.strip()}"' for net in everyone.split(","))
    open_relay = WILDCARD + f"[relay]\ntrusted_networks = [{networks}]\n"
    result = run_cli("check-config", "--config", str(write_config(tmp_path, open_relay)))
    assert result.returncode == 0, result.stderr
    [warning] = result.stderr.splitlines()
    assert warning.startswith("trio-mta: warning: [relay].trusted_networks: ")
    assert everyone.replace(" ", "") in warning.replace(" ", "") and "0.0.0.0:0" in warning
    assert "open relay" in warning


def test_check_config_is_quiet_when_only_loopback_listens(tmp_path: Path) -> None:
    loopback_only = BASE + '[relay]\ntrusted_networks = ["0.0.0.0/0"]\n'
    result = run_cli("check-config", "--config", str(write_config(tmp_path, loopback_only)))
    assert (result.returncode, result.stderr) == (0, "")
    narrow = WILDCARD + '[relay]\ntrusted_networks = ["0.0.0.0/1"]\n'
    result = run_cli("check-config", "--config", str(write_config(tmp_path, narrow)))
    assert (result.returncode, result.stderr) == (0, "")
