"""Every file in examples/ works as its comments say, against loopback.

The Python examples run as the user runs them (``python examples/x.py``, a
real process, real sockets); the production config is checked by the real
``check-config`` and then served with its paths and ports moved into a temp
folder; the systemd unit is parsed, cross-checked against the config's
paths, and verified by ``systemd-analyze`` when the machine has it.
"""

from __future__ import annotations

import configparser
import os
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

import trio_mta
from trio_mta.client import SMTPSendError
from trio_mta.server.passwords import PasswordFile

from .maildirs import new_files, wait_for_mail
from .proc import run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MTA_TOML = EXAMPLES / "mta.toml"
UNIT = EXAMPLES / "trio-mta.service"
MX = "mx.example.org"
TIMEOUT = 20.0


# ---------------------------------------------------------------- helpers


class Example:
    """``python examples/NAME args...`` with its stdout read line by line in a thread."""

    def __init__(self, name: str, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args],
            cwd=cwd,
            text=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """The next output line matching ``pattern`` (regex), waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r}; output so far:\n" + "".join(self.seen)
                ) from None
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def port(self) -> int:
        return int(self.expect(r"listening on 127\.0\.0\.1:(\d+) \(smtp\)").group(1))

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def cleanup() -> Iterator[list[Example]]:
    started: list[Example] = []
    yield started
    for example in started:
        if example.proc.poll() is None:
            example.proc.kill()
            example.proc.wait()


def send_one(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "send_one.py"), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
    )


def rewrite_mta_toml(tmp_path: Path, ca: trustme.CA) -> Path:
    """examples/mta.toml with its certificate, folders and ports moved into tmp_path.

    Every replaced string must occur exactly as often as expected, so an edit
    of the example that this test no longer covers fails here.
    """
    cert = ca.issue_cert(MX, "127.0.0.1")
    chain, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    replacements = {
        f'"/etc/letsencrypt/live/{MX}/fullchain.pem"': (f'"{chain}"', 1),
        f'"/etc/letsencrypt/live/{MX}/privkey.pem"': (f'"{key}"', 1),
        '"/var/lib/trio-mta"': (f'"{tmp_path / "state"}"', 1),
        '"/var/lib/trio-mta/passwd"': (f'"{tmp_path / "state" / "passwd"}"', 1),
        '"/var/mail/trio-mta"': (f'"{tmp_path / "mail"}"', 1),
        '"0.0.0.0:25"': ('"127.0.0.1:0"', 1),
        '"0.0.0.0:587"': ('"127.0.0.1:0"', 1),
        '"0.0.0.0:465"': ('"127.0.0.1:0"', 1),
        'listen = "127.0.0.1:9125"': ('listen = "127.0.0.1:0"', 1),
    }
    text = MTA_TOML.read_text()
    for old, (new, count) in replacements.items():
        assert text.count(old) == count, f"examples/mta.toml: {old} found {text.count(old)}x"
        text = text.replace(old, new)
    path = tmp_path / "mta.toml"
    path.write_text(text)
    return path


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


# ---------------------------------------------------------------- mta.toml


def test_mta_toml_fails_check_config_only_for_the_missing_certificate(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(MTA_TOML))
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert errors, "check-config printed no error"
    for line in errors:
        assert "[tls].cert" in line or "[tls].key" in line, line
    assert "/etc/letsencrypt/live/mx.example.org/" in result.stderr


def test_mta_toml_with_local_paths_passes_check_config(tmp_path: Path, ca: trustme.CA) -> None:
    result = run_cli("check-config", "--config", str(rewrite_mta_toml(tmp_path, ca)))
    assert result.returncode == 0, result.stderr
    assert f"hostname: {MX}" in result.stdout
    modes = re.findall(r"^listen: 127\.0\.0\.1:0 (\w+)", result.stdout, re.MULTILINE)
    assert modes == ["smtp", "submission", "smtps"]


async def test_mta_toml_delivers_mailboxes_and_aliases(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    config = trio_mta.Config.load(rewrite_mta_toml(tmp_path, ca))
    mta: trio_mta.MTA = await nursery.start(trio_mta.serve, config)
    host, port = mta.address("smtp")

    async def send(*recipients: str) -> trio_mta.SendResult:
        message = (
            f"From: someone@remote.test\r\nTo: {', '.join(recipients)}\r\n"
            "Subject: example\r\n\r\nhello\r\n"
        ).encode()
        return await trio_mta.send_message(
            message,
            sender="someone@remote.test",
            recipients=list(recipients),
            host=host,
            port=port,
            tls="verify",
            ssl_context=trusting(ca),
            server_hostname=MX,
        )

    result = await send("postmaster@example.org", "Alice.Smith@example.org")
    assert result.tls and result.tls.startswith("TLSv1.")
    root = tmp_path / "mail"
    [copy] = await wait_for_mail(root, "alice")  # both addresses land in one mailbox, once
    await send("abuse@example.org")
    await wait_for_mail(root, "bob")
    await wait_for_mail(root, "alice", 2)
    with pytest.raises(SMTPSendError) as refused:
        await send("carol@example.org")  # a mailbox map: unknown users refused at RCPT
    assert refused.value.reply is not None and refused.value.reply.code == 550
    assert refused.value.status == "5.1.1"
    assert b"Delivered-To: alice@example.org" in copy.read_bytes()  # the final address
    assert not new_files(root, "carol")
    # [metrics] listen from the example serves Prometheus text; the counters moved
    assert mta.metrics_address is not None
    url = "http://{}:{}/metrics".format(*mta.metrics_address)
    delivered = 'trio_mta_recipients_total{destination="local",outcome="delivered"} 3.0'
    with trio.fail_after(TIMEOUT):
        while delivered not in (text := await trio.to_thread.run_sync(scrape, url)):
            await trio.sleep(0.05)
    assert 'trio_mta_messages_rejected_total{reason="unknown_user"} 1.0' in text
    assert 'trio_mta_messages_accepted_total{listener="smtp"} 2.0' in text


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        body: bytes = response.read()
    return body.decode()


async def test_send_one_submits_with_auth_and_tls_options(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    config = trio_mta.Config.load(rewrite_mta_toml(tmp_path, ca))
    PasswordFile(config.auth.users_file).set_password("alice", "correct horse")
    mta: trio_mta.MTA = await nursery.start(trio_mta.serve, config)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    _, submission = mta.address("submission")
    _, smtps = mta.address("smtps")

    base = ("127.0.0.1", str(submission), "alice@example.org", "bob@example.org")
    verified = ("--cafile", str(ca_file), "--server-hostname", MX)
    runs: dict[str, tuple[tuple[str, ...], str | None]] = {
        "starttls": ((*base, "--tls", "verify", *verified, "--user", "alice"), "correct horse"),
        "implicit": (
            ("127.0.0.1", str(smtps), *base[2:], "--tls", "implicit", *verified, "--user", "alice"),
            "correct horse",
        ),
        "no_auth": ((*base, "--tls", "required"), None),
        "wrong": ((*base, "--tls", "required", "--user", "alice"), "wrong"),
        # verify without the private CA: the certificate is refused
        "untrusted": ((*base, "--tls", "verify", "--server-hostname", MX), None),
    }
    done: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(name: str) -> None:
        args, password = runs[name]
        env = {**os.environ, **({"SMTP_PASSWORD": password} if password else {})}
        done[name] = await trio.run_process(
            [sys.executable, str(EXAMPLES / "send_one.py"), *args],
            env=env,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
            stdin=subprocess.DEVNULL,
        )

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as processes:  # one Python start-up's wait, not five
            for name in runs:
                processes.start_soon(run, name)
    out = {name: (r.returncode, r.stdout.decode() + r.stderr.decode()) for name, r in done.items()}
    for name in ("starttls", "implicit"):
        code, text = out[name]
        assert code == 0, text
        assert "TLSv1." in text and "accepted: bob@example.org" in text
        assert re.search(r"message: 250 2\.0\.0 Ok: queued as \S+", text)
    copies = await wait_for_mail(tmp_path / "mail", "bob", 2)
    assert all(b"(Authenticated sender: alice)" in c.read_bytes() for c in copies)
    assert out["no_auth"][0] == 1 and "530 5.7.0" in out["no_auth"][1]
    assert out["wrong"][0] == 1 and "535 5.7.8" in out["wrong"][1]
    assert out["untrusted"][0] == 1 and "certificate verification failed" in out["untrusted"][1]
    assert not any("Traceback" in text for _, text in out.values())


# ---------------------------------------------------------------- the Python examples


def test_receive_into_app_prints_and_refuses(tmp_path: Path, cleanup: list[Example]) -> None:
    app = Example(
        "receive_into_app.py",
        "--port",
        "0",
        "--domain",
        "example.org",
        "--state-dir",
        str(tmp_path / "app"),
        cwd=tmp_path,
    )
    cleanup.append(app)
    port = app.port()
    sent = send_one(
        "127.0.0.1",
        str(port),
        "me@remote.test",
        "you@example.org",
        "--subject",
        "hello app",
        "--tls",
        "required",
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "message: 250 2.0.0 Ok: message 1 received" in sent.stdout
    line = app.expect(r"^message from ").string
    assert "me@remote.test to you@example.org subject 'hello app'" in line
    assert "TLSv1." in line  # --tls required: STARTTLS with the generated certificate
    refused = send_one(
        "127.0.0.1", str(port), "me@remote.test", "x@elsewhere.test", "--tls", "none"
    )
    assert refused.returncode == 1
    assert "refused x@elsewhere.test: 550 5.1.1" in refused.stdout
    # nothing is queued or delivered without the queue
    assert not (tmp_path / "app" / "queue.sqlite3").exists()
    assert app.stop(signal.SIGINT) == 0
    app.expect(r"^stopping$")


def test_embed_full_mta_delivers_and_reports_the_queue(
    tmp_path: Path, cleanup: list[Example]
) -> None:
    state = tmp_path / "embed"
    app = Example(
        "embed_full_mta.py",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(state),
        "--interval",
        "0.2",
        cwd=tmp_path,
    )
    cleanup.append(app)
    port = app.port()
    app.expect(rf"mail for localhost goes to {re.escape(str(state / 'mail'))}")
    app.expect(r"^queue: 0 message\(s\), 0 recipient\(s\) waiting; 0 delivered")
    sent = send_one("127.0.0.1", str(port), "me@remote.test", "someone@localhost", "--tls", "none")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    app.expect(r"; 1 delivered since start")
    [copy] = new_files(state / "mail", "someone")
    assert b"Delivered-To: someone@localhost" in copy.read_bytes()
    assert app.stop(signal.SIGTERM) == 0


def test_embed_full_mta_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[queue]\nretry_intial = "5m"\n')
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed_full_mta.py"), "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    assert "unknown key [queue].retry_intial (did you mean retry_initial?)" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- the systemd unit


def read_unit() -> configparser.RawConfigParser:
    # systemd allows repeated keys (SystemCallFilter=); strict=False keeps the last.
    parser = configparser.RawConfigParser(
        strict=False, delimiters=("=",), comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_structure_matches_the_config() -> None:
    unit = read_unit()
    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    assert service["Type"] == "exec"
    assert service["User"] == "trio-mta"
    assert "CAP_NET_BIND_SERVICE" in service["AmbientCapabilities"].split()
    assert service["CapabilityBoundingSet"].split() == ["CAP_NET_BIND_SERVICE"]
    assert service["NoNewPrivileges"] == "yes" and service["PrivateTmp"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["LimitNOFILE"] == "65536"
    assert service["ExecStart"].split()[1:] == ["serve", "--config", "/etc/trio-mta/mta.toml"]
    assert service["ExecStartPre"].split()[1:] == [
        "check-config",
        "--config",
        "/etc/trio-mta/mta.toml",
    ]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # Under ProtectSystem=strict every path the example config writes must be listed.
    config = tomllib.loads(MTA_TOML.read_text())
    writable = [Path(p) for p in service["ReadWritePaths"].split()]
    written = [
        Path(config["state_dir"]),
        Path(config["local"]["maildir_root"]),
        Path(config["auth"]["users_file"]).parent,
    ]
    for path in written:
        assert any(path == w or w in path.parents for w in writable), path
    # ports below 1024 are why the capability is there
    assert all(int(item["address"].rsplit(":", 1)[1]) < 1024 for item in config["listen"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    trio_mta_bin = shutil.which("trio-mta")
    if trio_mta_bin is None:
        pytest.skip("trio-mta console script not on PATH")
    # verify insists that ExecStart= names an executable file on this machine
    unit = tmp_path / "trio-mta.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/trio-mta", trio_mta_bin))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [
        ln for ln in (result.stdout + result.stderr).splitlines() if "trio-mta.service" in ln
    ]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
