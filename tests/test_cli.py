"""The command line as a user meets it: exit codes, one-line errors, signals."""

from __future__ import annotations

import json
import signal
import smtplib
import socket
from pathlib import Path

from .dnsserver import DnsServer
from .proc import ServerProcess, run_cli


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "mta.toml"
    path.write_text(body)
    return path


BASE = """
hostname = "mx.cli.test"
state_dir = "state"
[[listen]]
address = "127.0.0.1:0"
mode = "smtp"
[local]
domains = ["cli.test"]
"""


def test_check_config_ok_prints_listeners(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(write_config(tmp_path, BASE)))
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1:0" in result.stdout and "smtp" in result.stdout


def test_config_before_subcommand_and_env(tmp_path: Path) -> None:
    config = write_config(tmp_path, BASE)
    assert run_cli("--config", str(config), "check-config").returncode == 0
    assert run_cli("check-config", env={"TRIO_MTA_CONFIG": str(config)}).returncode == 0


def test_bad_config_names_every_key(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        BASE
        + """
[limits]
max_recipients = "x"
[relay]
smarthst = "a"
""",
    )
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "max_recipients" in result.stderr and "smarthst" in result.stderr
    assert "Traceback" not in result.stderr
    # serve refuses the same file the same way
    served = run_cli("serve", "--config", str(config))
    assert served.returncode == 2 and "Traceback" not in served.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml" in result.stderr and "Traceback" not in result.stderr


def test_usage_error_exits_2() -> None:
    result = run_cli("queue", "frobnicate")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        config = write_config(tmp_path, BASE.replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        result = run_cli("serve", "--config", str(config))
    finally:
        busy.close()
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "cannot listen" in line]
    assert errors == [f"trio-mta: cannot listen on 127.0.0.1:{port} (smtp): address already in use"]
    assert "Traceback" not in result.stderr


def test_serve_delivers_then_stops_on_sigterm(tmp_path: Path) -> None:
    config = write_config(tmp_path, BASE)
    server = ServerProcess.start(config)
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as client:
            client.sendmail("a@remote.test", ["bob@cli.test"], b"Subject: t\r\n\r\nhello\r\n")
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0, "".join(server.log)
    assert any("mta.stopped" in line for line in server.log)


def test_listen_flag_overrides_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, BASE)
    server = ServerProcess.start(
        config, "--listen", "127.0.0.1:0/submission", "--state-dir", str(tmp_path / "other")
    )
    try:
        assert set(server.ports) == {"submission"}
    finally:
        assert server.stop() == 0
    assert (tmp_path / "other").is_dir()


def test_queue_commands(tmp_path: Path, dns_server: DnsServer) -> None:
    host, port = dns_server.address
    config = write_config(
        tmp_path,
        BASE
        + f"""
[relay]
trusted_networks = ["127.0.0.0/8"]
[dns]
nameservers = ["{host}:{port}"]
""",
    )
    server = ServerProcess.start(config)
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as client:
            client.sendmail("a@cli.test", ["far@remote.test"], b"Subject: queued\r\n\r\nx\r\n")
    finally:
        assert server.stop() == 0
    listed = run_cli("queue", "list", "--json", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["sender"] == "a@cli.test"
    assert row["recipients"][0]["address"] == "far@remote.test"
    assert row["recipients"][0]["status"] in ("pending", "deferred")
    human = run_cli("queue", "list", "--config", str(config))
    assert row["id"] in human.stdout
    shown = run_cli("queue", "show", row["id"], "--config", str(config))
    assert shown.returncode == 0 and "Subject: queued" in shown.stdout
    assert run_cli("queue", "flush", "--config", str(config)).returncode == 0
    assert run_cli("queue", "show", "NOSUCHID", "--config", str(config)).returncode == 1
    assert run_cli("queue", "delete", row["id"], "--config", str(config)).returncode == 0
    after = run_cli("queue", "list", "--json", "--config", str(config))
    assert json.loads(after.stdout) == []


def test_every_queue_command_says_there_is_no_queue_and_where(tmp_path: Path) -> None:
    """`queue list` used to print "Mail queue is empty" (exit 0) where flush said no queue."""
    config = write_config(tmp_path, BASE)
    where = str(tmp_path / "state" / "queue.sqlite3")
    for command in (["list"], ["list", "--json"], ["show", "X"], ["flush"], ["delete", "X"]):
        result = run_cli("queue", *command, "--config", str(config))
        assert result.returncode == 1, command
        assert result.stdout == "", command
        assert f"trio-mta queue: no queue at {where}" in result.stderr, command
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "queue.sqlite3").exists()  # looking creates nothing


def test_sighup_reloads_maps_for_an_open_session(tmp_path: Path) -> None:
    mapped = (
        BASE
        + """
[local.mailboxes]
"alice@cli.test" = "alice"
"""
    )
    config = write_config(tmp_path, mapped)
    server = ServerProcess.start(config)
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as client:
            client.ehlo("c.test")
            client.mail("a@remote.test")
            assert client.rcpt("bob@cli.test")[0] == 550
            config.write_text(mapped + '"bob@cli.test" = "bob"\n')
            server.proc.send_signal(signal.SIGHUP)
            # No [server] workers: one per core; each worker reloads on its own.
            assert server.wait_for_log("config.reloaded", count=server.workers)
            assert client.rcpt("bob@cli.test")[0] == 250  # same session, new map
            # A broken file is logged and the running config kept.
            config.write_text(mapped + "[limits]\nmax_recipients = -1\n")
            server.proc.send_signal(signal.SIGHUP)
            assert server.wait_for_log("config.reload_failed", count=server.workers)
            assert client.rcpt("bob@cli.test")[0] == 250
            assert client.rcpt("carol@cli.test")[0] == 550
    finally:
        assert server.stop() == 0
    failed = [line for line in server.log if "config.reload_failed" in line]
    assert "max_recipients" in failed[0]
