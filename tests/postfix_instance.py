"""A private, full Postfix instance on loopback for interop tests.

The instance lives entirely in a temp directory: its own ``config_directory``
(``postfix -c DIR``), ``queue_directory`` and ``data_directory``, so the
machine's /etc/postfix/main.cf and system queue are never read for mail nor
written, and a system Postfix that happens to run (the bench peer) is not
disturbed. Only smtpd listens, on one 127.0.0.1 port. Postfix never asks DNS:
its SMTP client has DNS disabled and reaches only the ``[ip]:port`` next hops
of its transport map (every other destination fails with ``error:``), and
smtpd does not look up client names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

COMMAND_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# virtual(8) delivers as this uid/gid: nobody exists everywhere, so tests add no user.
NOBODY = 65534


def unavailable() -> str | None:
    """Why a private Postfix cannot run here, or None when it can."""
    if shutil.which("postfix") is None or shutil.which("postconf") is None:
        return "Postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a Postfix instance must be started as root"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on *host* now, for a daemon that must be told its port."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PostfixInstance:
    """One Postfix (master, smtpd, cleanup, qmgr, smtp, virtual) under ``root``.

    ``mailboxes`` maps addresses of ``virtual_domain`` to Maildir names under
    :attr:`mail_base` (virtual(8), as uid nobody); ``transports`` maps domains
    to next hops such as ``smtp:[127.0.0.1]:2525``. ``tls_chain``/``tls_key``
    give smtpd its certificate for STARTTLS.
    """

    root: Path
    port: int
    tls_chain: Path
    tls_key: Path
    virtual_domain: str
    mailboxes: Mapping[str, str]
    transports: Mapping[str, str] = field(default_factory=dict)
    hostname: str = "mx.pf.test"

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "spool"

    @property
    def data_dir(self) -> Path:
        return self.root / "lib"

    @property
    def mail_base(self) -> Path:
        return self.root / "mail"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def maildir_new(self, mailbox: str) -> list[Path]:
        folder = self.mail_base / mailbox / "new"
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return "(no maillog written)"

    # --- setup ---------------------------------------------------------------

    def _run(self, *args: str) -> str:
        """Run a Postfix command for this instance; its output is part of any failure."""
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
            env={**os.environ, "MAIL_CONFIG": str(self.config_dir)},
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done.stdout + done.stderr

    def postconf(self, *args: str) -> str:
        out = self._run("postconf", "-c", str(self.config_dir), *args)
        self._backdate()
        return out

    def _backdate(self) -> None:
        """Age main.cf and master.cf: Postfix programs sleep while a config file is
        less than a second old (a guard against reading it half-written), which
        would cost a second or two per command here."""
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    def configure(self) -> None:
        """Write main.cf and master.cf; Postfix wants root-owned, non-writable paths."""
        self.root.chmod(0o755)  # the postfix user must traverse it to its queue
        self.config_dir.mkdir(mode=0o755)
        self.queue_dir.mkdir(mode=0o755)
        self.mail_base.mkdir(mode=0o755)
        os.chown(self.mail_base, NOBODY, NOBODY)
        # master.cf: the system's services (with its daemon paths), minus every
        # network listener; main.cf starts empty so no system setting leaks in.
        shutil.copy(Path("/etc/postfix/master.cf"), self.config_dir / "master.cf")
        (self.config_dir / "main.cf").write_text("")
        self._backdate()
        self.postconf("-e", *self._main_cf())
        for line in self.postconf("-M").splitlines():
            name, kind = line.split()[:2]
            if kind == "inet":
                self.postconf("-MX", f"{name}/{kind}")
        address = f"127.0.0.1:{self.port}"
        self.postconf("-M", f"{address}/inet={address} inet n - n - - smtpd")
        self.postconf("-F", "*/*/chroot = n")  # a chroot would need copies of /etc files

    def _main_cf(self) -> list[str]:
        mailboxes = ", ".join(f"{addr}={box}/" for addr, box in self.mailboxes.items())
        transports = ", ".join(f"{dom}={hop}" for dom, hop in self.transports.items())
        refuse = "error:5.7.1 this test instance only delivers through transport_maps"
        return [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue_dir}",
            f"data_directory = {self.data_dir}",
            f"myhostname = {self.hostname}",
            f"mydomain = {self.virtual_domain}",
            "myorigin = $myhostname",
            "mydestination =",
            "alias_maps =",
            "alias_database =",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            # No DNS anywhere: client names are not looked up, next hops are literals.
            "smtpd_peername_lookup = no",
            "smtp_dns_support_level = disabled",
            "smtp_host_lookup = native",
            f"default_transport = {refuse}",
            f"relay_transport = {refuse}",
            f"transport_maps = inline:{{ {transports} }}" if transports else "transport_maps =",
            f"virtual_mailbox_domains = {self.virtual_domain}",
            f"virtual_mailbox_base = {self.mail_base}",
            f"virtual_mailbox_maps = inline:{{ {mailboxes} }}",
            f"virtual_uid_maps = static:{NOBODY}",
            f"virtual_gid_maps = static:{NOBODY}",
            "virtual_minimum_uid = 100",
            "smtpd_tls_security_level = may",
            f"smtpd_tls_chain_files = {self.tls_key}, {self.tls_chain}",
            "smtpd_tls_received_header = yes",
            "smtpd_tls_loglevel = 1",
            "smtp_tls_security_level = may",
            "smtp_tls_loglevel = 1",
            # Deliver at once; a deferred message retries quickly if a test is slow.
            "queue_run_delay = 1s",
            "minimal_backoff_time = 1s",
            "maximal_backoff_time = 2s",
            f"maillog_file = {self.maillog}",
            f"maillog_file_prefixes = {self.root}",
        ]

    # --- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Start master and wait until smtpd accepts on :attr:`port`.

        ``postfix start`` first runs what ``postfix check`` runs: ``post-install
        create-missing`` (the queue directories, owned by postfix under a
        root-owned queue_directory) and the ownership and permission checks,
        failing here with their message when something is wrong.
        """
        self._run("postfix", "-c", str(self.config_dir), "start")
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Postfix smtpd not listening on {self.port}:\n{self.log_text()}"
                    ) from None
                time.sleep(0.05)

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def processes(self) -> list[int]:
        """Pids of this instance: every process whose MAIL_CONFIG is our config dir.

        ``_run`` starts master with MAIL_CONFIG set and master passes it to its
        children, so this finds our master, smtpd, qmgr ... and never the
        system Postfix, without trusting a pid file that may be stale.
        """
        marker = f"MAIL_CONFIG={self.config_dir}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """``postfix stop``, then SIGKILL whatever of this instance outlives the timeout."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("postfix", "-c", str(self.config_dir), "stop")
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_postfix(
    *,
    tls_chain: Path,
    tls_key: Path,
    virtual_domain: str,
    mailboxes: Mapping[str, str],
    transports: Mapping[str, str] | None = None,
) -> Iterator[PostfixInstance]:
    """A started instance in a fresh temp dir; stopped and removed on exit.

    The temp dir is made here rather than by pytest's tmp_path, whose parents
    are mode 0700: the postfix and nobody users must reach their directories.
    """
    root = Path(tempfile.mkdtemp(prefix="trio-mta-postfix-"))
    instance = PostfixInstance(
        root=root,
        port=free_port(),
        tls_chain=tls_chain,
        tls_key=tls_key,
        virtual_domain=virtual_domain,
        mailboxes=mailboxes,
        transports=transports or {},
    )
    try:
        instance.configure()
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)
