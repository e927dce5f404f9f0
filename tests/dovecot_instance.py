"""A private Dovecot (LMTP and IMAP on loopback) for the LMTP and shared-Maildir tests.

Everything lives under one temp directory: its own config (``dovecot -c``),
``base_dir``, ``state_dir``, log, passwd-file users and Maildir root, so a
system Dovecot (Debian starts one on install) is neither read nor disturbed.
Dovecot's own services run as root (internal) and dovenull (login); mail is
read and written as uid nobody in group ``mail``, the way a real Dovecot
never runs as trio_mta's user: so the shared-Maildir test proves the group
modes work. ``mail_root`` must therefore be reachable by that user (the
fixture puts it in a world-traversable temp directory). Stopped with
``doveadm stop``, then by PID if that did not work.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .postfix_instance import free_port

START_TIMEOUT = 15.0
PASSWORD = "dovecot-secret"
NOBODY = 65534


def mail_gid() -> int:
    return grp.getgrnam("mail").gr_gid


def unavailable() -> str | None:
    """Why a private Dovecot cannot run here, or None when it can."""
    if shutil.which("dovecot") is None or shutil.which("doveadm") is None:
        return "Dovecot is not installed (apt-get install dovecot-lmtpd dovecot-imapd)"
    if not Path("/usr/lib/dovecot/lmtp").exists() or not Path("/usr/lib/dovecot/imap").exists():
        return "dovecot-lmtpd and dovecot-imapd are needed"
    try:
        grp.getgrnam("mail")
    except KeyError:
        return "no group named mail"
    if os.geteuid() != 0:
        return "a private Dovecot must be started as root"
    return None


@dataclass
class DovecotInstance:
    """Dovecot with users ``users`` (password :data:`PASSWORD`), mail in ``mail_root/USER``."""

    root: Path
    mail_root: Path
    users: tuple[str, ...]
    lmtp_port: int = 0
    imap_port: int = 0
    # Users whose quota (1 KiB) a message of a few hundred bytes cannot fit twice: the
    # quota plugin then answers 452 4.2.2 after the data (quota_full_tempfail).
    tiny_quota: tuple[str, ...] = ()

    @property
    def config(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def lmtp_target(self) -> str:
        return f"127.0.0.1:{self.lmtp_port}"

    def write_config(self) -> None:
        self.lmtp_port, self.imap_port = free_port(), free_port()
        for sub in ("run", "state"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        uid, gid = NOBODY, mail_gid()
        (self.root / "users").write_text(
            "".join(
                f"{user}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{self.mail_root / user}::"
                f"{'userdb_quota_rule=*:storage=1K' if user in self.tiny_quota else ''}\n"
                for user in self.users
            )
        )
        self.config.write_text(f"""\
base_dir = {self.root / "run"}
state_dir = {self.root / "state"}
log_path = {self.root / "dovecot.log"}
protocols = lmtp imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = 1
default_internal_user = root
default_login_user = dovenull
default_internal_group = root
mail_location = maildir:{self.mail_root}/%n
auth_username_format = %Ln
mail_plugins = quota
quota_full_tempfail = yes
plugin {{
  quota = maildir:User quota
}}
passdb {{
  driver = passwd-file
  args = {self.root / "users"}
}}
userdb {{
  driver = passwd-file
  args = {self.root / "users"}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
  unix_listener lmtp {{
    mode = 0600
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")

    def start(self) -> None:
        # The daemon keeps inherited pipes open: its output goes to a file, not to us.
        with open(self.root / "start.err", "wb") as err:
            started = subprocess.run(
                ["dovecot", "-c", str(self.config)],
                timeout=30,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                check=False,
            )
        if started.returncode != 0:
            raise RuntimeError(f"dovecot did not start: {(self.root / 'start.err').read_text()}")
        deadline = time.monotonic() + START_TIMEOUT
        for port in (self.lmtp_port, self.imap_port):
            while True:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=1),
                ):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Dovecot did not listen on {port}: {self.log()}")
                time.sleep(0.05)

    def stop(self) -> None:
        pid_file = self.root / "run" / "master.pid"
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        subprocess.run(
            ["doveadm", "-c", str(self.config), "stop"],
            timeout=30,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        if pid is None:
            return
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else "(no log)"


@contextlib.contextmanager
def running_dovecot(
    root: Path, mail_root: Path, users: tuple[str, ...]
) -> Iterator[DovecotInstance]:
    instance = DovecotInstance(root, mail_root, users)
    instance.write_config()
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
