#!/usr/bin/env python3
"""Scan trio_mta's TLS with testssl.sh: implicit TLS (smtps) and STARTTLS (smtp).

Starts a real server on loopback with its generated self-signed certificate,
runs ``testssl --nodns none`` (no DNS lookups at all: nothing leaves the
machine) for protocols, cipher categories, forward secrecy, renegotiation and
compression, and prints a summary of the findings that matter for a mail
server: no protocol below TLS 1.2, no weak cipher category, no compression,
no insecure renegotiation. It reports; it never fails on findings.

usage: bench/tls_scan.py [--keep-json DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = ["-p", "-s", "-f", "-R", "-C", "-S"]
INTERESTING = (
    "SSLv2",
    "SSLv3",
    "TLS1",
    "TLS1_1",
    "TLS1_2",
    "TLS1_3",
    "cipherlist_NULL",
    "cipherlist_aNULL",
    "cipherlist_EXPORT",
    "cipherlist_LOW",
    "cipherlist_3DES_IDEA",
    "cipherlist_AVERAGE",
    "cipherlist_GOOD",
    "cipherlist_STRONG",
    "cipherlist_OBSOLETED",
    "FS",
    "secure_renego",
    "secure_client_renego",
    "CRIME_TLS",
    "TLS_session_ticket",
    "cert_keySize",
    "cert_signatureAlgorithm",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(workdir: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    smtp, smtps = free_port(), free_port()
    config = workdir / "scan.toml"
    config.write_text(f"""
hostname = "tls-scan.localdomain"
state_dir = "state"
[[listen]]
address = "127.0.0.1:{smtp}"
mode = "smtp"
[[listen]]
address = "127.0.0.1:{smtps}"
mode = "smtps"
[local]
domains = ["scan.test"]
[log]
level = "warning"
""")
    # The scan's deliberately failing handshakes are logged; keep them out of the report.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trio_mta",
            "serve",
            "--config",
            str(config),
            "--log-file",
            str(workdir / "server.log"),
        ],
        cwd=REPO,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", smtps), timeout=1).close()
            return proc, smtp, smtps
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("trio_mta did not start")


def scan(label: str, target: list[str], out: Path) -> list[dict[str, str]]:
    cmd = [
        "testssl",
        "--quiet",
        "--color",
        "0",
        "--warnings",
        "off",
        "--nodns",
        "none",
        "--connect-timeout",
        "10",
        "--openssl-timeout",
        "10",
        *CHECKS,
        "--jsonfile",
        str(out),
        *target,
    ]
    print(f"$ {' '.join(cmd)}", flush=True)
    subprocess.run(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900, check=False
    )
    findings: list[dict[str, str]] = json.loads(out.read_text()) if out.exists() else []
    print(f"\n== {label}")
    for item in findings:
        if item.get("id") in INTERESTING:
            print(f"  {item['id']:<26} {item.get('severity', ''):<8} {item.get('finding', '')}")
    bad = [i for i in findings if i.get("severity") in ("MEDIUM", "HIGH", "CRITICAL")]
    print(
        f"  -> {len(bad)} finding(s) of severity MEDIUM or worse"
        + "".join(f"\n     {i['id']}: {i.get('finding', '')}" for i in bad)
    )
    return findings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-json", type=Path, help="keep testssl's JSON files here")
    args = parser.parse_args()
    if shutil.which("testssl") is None:
        print("testssl not installed: apt-get install testssl.sh", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        proc, smtp, smtps = start_server(workdir)
        out = args.keep_json or workdir
        out.mkdir(parents=True, exist_ok=True)
        try:
            scan("smtps (implicit TLS)", [f"127.0.0.1:{smtps}"], out / "smtps.json")
            scan(
                "smtp + STARTTLS",
                ["--starttls", "smtp", f"127.0.0.1:{smtp}"],
                out / "starttls.json",
            )
        finally:
            proc.terminate()
            proc.wait(timeout=40)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
