"""swaks, a real third-party SMTP client, against a real server (skipped where missing)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest
import trio

from trio_mta.config import Config
from trio_mta.mta import MTA, serve
from trio_mta.server.passwords import PasswordFile

from .maildirs import wait_for_mail

pytestmark = pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks not installed (.ci/run installs it)"
)


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--timeout", "10", *args], capture_output=True, text=True, timeout=60
    )


async def test_swaks_plain_pipelined(mta: MTA) -> None:
    port = mta.address("smtp")[1]
    result = await trio.to_thread.run_sync(
        lambda: swaks(
            "--server",
            f"127.0.0.1:{port}",
            "--from",
            "s@remote.test",
            "--to",
            "dave@example.test,erin@example.test",
            "--pipeline",
            "--header",
            "Subject: swaks plain",
        )
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    root = mta.config.local.maildir_root
    [dave] = await wait_for_mail(root, "dave")
    await wait_for_mail(root, "erin")
    assert b"Subject: swaks plain" in dave.read_bytes()


async def test_swaks_starttls_auth_submission(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    config = make_config()
    PasswordFile(config.auth.users_file).set_password("frank", "pw-of-frank")
    server: MTA = await nursery.start(serve, config)
    port = server.address("submission")[1]
    refused = await trio.to_thread.run_sync(
        lambda: swaks(
            "--server",
            f"127.0.0.1:{port}",
            "--from",
            "frank@example.test",
            "--to",
            "gina@example.test",
            "--tls",
        )
    )
    assert refused.returncode != 0 and "530 5.7.0" in refused.stdout
    result = await trio.to_thread.run_sync(
        lambda: swaks(
            "--server",
            f"127.0.0.1:{port}",
            "--from",
            "frank@example.test",
            "--to",
            "gina@example.test",
            "--tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            "frank",
            "--auth-password",
            "pw-of-frank",
        )
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    [path] = await wait_for_mail(config.local.maildir_root, "gina")
    content = path.read_bytes()
    assert b"with ESMTPSA" in content and b"(Authenticated sender: frank)" in content
    assert b"pw-of-frank" not in content
