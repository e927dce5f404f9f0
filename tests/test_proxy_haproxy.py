"""A real HAProxy (``mode tcp``, ``send-proxy`` and ``send-proxy-v2``) in front of a
PROXY protocol listener: smtplib connects to HAProxy from 127.0.0.2, HAProxy connects to
the MTA from 127.0.0.1, and the MTA must see 127.0.0.2 everywhere."""

from __future__ import annotations

import logging
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from trio_mta.config import Config
from trio_mta.mta import MTA, serve

from .maildirs import wait_for_mail

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = pytest.mark.skipif(
    not Path(HAPROXY).exists(), reason="needs HAProxy (apt-get install haproxy)"
)

CLIENT_ADDRESS = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"haproxy did not listen on {port}")


@contextmanager
def haproxy(tmp_path: Path, backend_port: int, send_proxy: str) -> Iterator[int]:
    """A private HAProxy in the foreground (-db) forwarding a free port; stopped by PID."""
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"""\
global
    maxconn 64
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp_in
    bind 127.0.0.1:{port}
    default_backend mta
backend mta
    server s1 127.0.0.1:{backend_port} {send_proxy}
""")
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def send_via(port: int, rcpt: str) -> tuple[int, str]:
    """One message from 127.0.0.2; (code, text) of RCPT's refusal, or (250, queue reply)."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(CLIENT_ADDRESS, 0), timeout=20) as client:
        client.ehlo("client.example")
        try:
            client.sendmail("alice@remote.test", [rcpt], b"Subject: via haproxy\r\n\r\nHello.\r\n")
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients[rcpt]
            return code, text.decode()
        return 250, "queued"


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
async def test_mail_through_haproxy_is_from_the_client_behind_it(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    send_proxy: str,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    config = make_config(
        listen=[{"address": "127.0.0.1:0", "proxy_protocol": True, "proxy_from": ["127.0.0.1/32"]}],
        relay={"trusted_networks": ["127.0.0.1/32"]},
    )
    server: MTA = await nursery.start(serve, config)
    with haproxy(tmp_path, server.address("smtp")[1], send_proxy) as port:
        # HAProxy itself (127.0.0.1) is trusted; the client behind it is not.
        refused = await trio.to_thread.run_sync(send_via, port, "bob@remote.test")
        assert refused[0] == 554 and "5.7.1" in refused[1], refused
        delivered = await trio.to_thread.run_sync(send_via, port, "bob@example.test")
        assert delivered[0] == 250
    [path] = await wait_for_mail(server.config.local.maildir_root, "bob")
    assert f"Received: from client.example ([{CLIENT_ADDRESS}])".encode() in path.read_bytes()
    connects = [
        getattr(r, "trio_mta_fields", {})
        for r in caplog.records
        if r.getMessage() == "smtpd.connect"
    ]
    # The readiness probe came from 127.0.0.1 through HAProxy; the two sessions after it
    # from 127.0.0.2.
    assert [(c["client"], c["proxy"]) for c in connects[-2:]] == [(CLIENT_ADDRESS, "127.0.0.1")] * 2
