"""The configuration file (SPEC §3): TOML in, frozen dataclasses out.

Loading never stops at the first problem: every error is collected and
:class:`ConfigError` reports them all, one line each, naming the key, so ``check-config``
can show a user everything to fix in one go. The checks themselves live in
:mod:`trio_mta.config.schema`; this module says which keys exist and what they default to.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, get_args

from trio_mta.config import schema
from trio_mta.config.durations import format_duration
from trio_mta.config.maps import MailMaps
from trio_mta.config.schema import Table, show
from trio_mta.milter.client import MilterSpec

if TYPE_CHECKING:
    from trio_mta.auth.keys import DkimKey

__all__ = [
    "AuthConfig",
    "Config",
    "ConfigError",
    "DkimConfig",
    "DnsConfig",
    "LimitsConfig",
    "ListenConfig",
    "LocalConfig",
    "LogConfig",
    "MetricsConfig",
    "QueueConfig",
    "RelayConfig",
    "ServerConfig",
    "TlsConfig",
    "VerifyConfig",
]

ListenMode = Literal["smtp", "submission", "smtps"]
OutboundTls = Literal["none", "opportunistic", "required", "verify"]
SmarthostTls = Literal["starttls", "implicit", "none"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]

DEFAULT_STATE_DIR = "trio-mta-data"
_LISTEN_NOTES: dict[str, str] = {
    "smtp": "STARTTLS",
    "submission": "STARTTLS, AUTH required",
    "smtps": "implicit TLS, AUTH required",
}


class ConfigError(Exception):
    """The configuration cannot be used. ``errors`` holds one line per problem."""

    def __init__(self, errors: str | Iterable[str]) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


@dataclass(frozen=True)
class ListenConfig:
    host: str
    port: int
    mode: ListenMode = "smtp"
    # SPEC §11: every connection begins with a PROXY header, accepted only from these peers.
    proxy_protocol: bool = False
    proxy_from: tuple[IPv4Network | IPv6Network, ...] = ()

    @property
    def address(self) -> str:
        """``host:port`` as the config writes it, IPv6 in brackets."""
        return schema.format_host_port(self.host, self.port)

    @classmethod
    def parse(cls, text: str) -> ListenConfig:
        """``ADDR:PORT[/MODE]`` as ``serve --listen`` takes it; raises :class:`ValueError`."""
        address, slash, mode = text.rpartition("/")
        if not slash:
            address, mode = text, "smtp"
        try:
            checked = schema.choice(_MODES)(mode)
        except ValueError as exc:
            raise ValueError(f"mode {exc}, got {show(mode)}") from None
        host, port = schema.parse_host_port(address)
        return cls(host, port, checked)

    def describe(self) -> str:
        notes = _LISTEN_NOTES[self.mode]
        if self.proxy_protocol:
            notes += ", PROXY protocol from " + " ".join(str(n) for n in self.proxy_from)
        return f"{self.address} {self.mode} ({notes})"


_MODES: tuple[ListenMode, ...] = get_args(ListenMode)
DEFAULT_LISTENERS = (
    ListenConfig("127.0.0.1", 2525, "smtp"),
    ListenConfig("127.0.0.1", 2587, "submission"),
    ListenConfig("127.0.0.1", 2465, "smtps"),
)


@dataclass(frozen=True)
class TlsConfig:
    """Certificate and key for the listeners; both None: a self-signed pair in state_dir."""

    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class LocalConfig:
    domains: tuple[str, ...]
    maildir_root: Path
    mailboxes_file: Path | None = None
    # None: no map configured, every local part is a mailbox (SPEC §3)
    mailboxes: Mapping[str, str] | None = None
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # Write local recipients into Maildir before the 250 (as durable as a queue row, and
    # no queue round trip); false: every message goes through the queue first.
    deliver_at_once: bool = True
    # LMTP server for local recipients ("127.0.0.1:24", "unix:/run/dovecot/lmtp"); None:
    # write Maildir. When set, deliver_at_once does not apply (mail goes via the queue).
    lmtp: str | None = None
    # Group id that shares the Maildir (a mail store such as Dovecot): folders 02770,
    # files 0660 in that group. None: folders 0700, files 0600.
    maildir_group: int | None = None


@dataclass(frozen=True)
class RelayConfig:
    trusted_networks: tuple[IPv4Network | IPv6Network, ...] = (
        ip_network("127.0.0.0/8"),
        ip_network("::1/128"),
    )
    tls: OutboundTls = "opportunistic"
    ca_file: Path | None = None
    port: int = 25
    smarthost: str = ""
    smarthost_tls: SmarthostTls = "starttls"
    smarthost_auth: str = ""
    prefer_ipv4: bool = False  # extra key: try A before AAAA (hosts with broken IPv6)
    mta_sts: bool = True  # SPEC §10: fetch, cache and apply MTA-STS policies (RFC 8461)
    dane: bool = True  # SPEC §10: apply authenticated TLSA records (RFC 7672)
    # Port of the MTA-STS policy host. RFC 8461 §3.3 fixes 443; only tests, whose
    # loopback policy server cannot bind 443, set it (undocumented on purpose).
    mta_sts_port: int = 443

    @property
    def smarthost_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the smarthost, None when unset.

        Without a port: 465 for implicit TLS (RFC 8314 §7.3), else 25.
        """
        if not self.smarthost:
            return None
        default = 465 if self.smarthost_tls == "implicit" else 25
        return schema.parse_host_port(self.smarthost, default_port=default)

    @property
    def smarthost_credentials(self) -> tuple[str, str] | None:
        """``(user, password)`` for AUTH at the smarthost, None when unset."""
        if not self.smarthost_auth:
            return None
        user, _, password = self.smarthost_auth.partition(":")
        return user, password


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[tuple[str, int], ...] = ()  # empty: the system resolver
    timeout: float = 5.0


@dataclass(frozen=True)
class QueueConfig:
    retry_initial: float = 300.0
    retry_max: float = 3600.0
    max_age: float = 5 * 86400.0
    concurrency: int = 20
    delay_warning: float = 4 * 3600.0  # RFC 3461 NOTIFY=DELAY: when the one notice goes


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int = 36700160
    max_recipients: int = 100
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    command_timeout: float = 300.0
    data_timeout: float = 600.0


@dataclass(frozen=True)
class AuthConfig:
    users_file: Path


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # "" = off

    @property
    def address(self) -> tuple[str, int] | None:
        return schema.parse_host_port(self.listen) if self.listen else None


MAX_WORKERS = 1024  # two base32 characters of worker number in a queue ID tag


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: how many worker processes serve (SPEC §12); 0 = one per CPU core."""

    workers: int = 0

    @property
    def effective_workers(self) -> int:
        """``workers``, with 0 resolved to the cores this process may run on."""
        if self.workers:
            return self.workers
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return max(1, min(cores, MAX_WORKERS))


@dataclass(frozen=True)
class LogConfig:
    level: LogLevel = "info"
    file: Path | None = None  # None: stderr
    format: LogFormat = "text"


@dataclass(frozen=True)
class DkimConfig:
    """``[[dkim.sign]]`` entries (SPEC §9), keys already loaded: a bad key is a config error."""

    sign: tuple[DkimKey, ...] = ()


@dataclass(frozen=True)
class VerifyConfig:
    """``[verify]`` (SPEC §9): checks on mail from untrusted, unauthenticated smtp clients."""

    spf: bool = True
    dkim: bool = True
    dmarc: bool = True
    dmarc_enforce: bool = False
    spf_enforce: bool = False

    @property
    def any(self) -> bool:
        return self.spf or self.dkim or self.dmarc


@cache
def default_hostname() -> str:
    """The machine's FQDN, cached: ``getfqdn`` may wait on DNS, and it does not change.

    Falls back to the plain host name, then ``localhost``, if the resolver returns
    something that is not a host name (it happens in containers).
    """
    for candidate in (socket.getfqdn(), socket.gethostname()):
        if schema.is_hostname(candidate):
            return candidate
    return "localhost"


@dataclass(frozen=True)
class Config:
    hostname: str
    state_dir: Path
    listen: tuple[ListenConfig, ...]
    tls: TlsConfig
    local: LocalConfig
    relay: RelayConfig
    dns: DnsConfig
    queue: QueueConfig
    limits: LimitsConfig
    auth: AuthConfig
    metrics: MetricsConfig
    log: LogConfig
    server: ServerConfig = ServerConfig()
    # SPEC §11 privilege drop: the account a server started as root switches to.
    user: str | None = None
    group: str | None = None  # None: the user's primary group
    milters: tuple[MilterSpec, ...] = ()  # [[milter]], in order (SPEC §11)
    source: Path | None = None
    dkim: DkimConfig = field(default_factory=DkimConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    # Paths that were derived from state_dir rather than written ("maildir_root",
    # "users_file"): with_overrides(state_dir=...) moves exactly these.
    _derived: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Config:
        """Read and check a TOML file; relative paths in it resolve against its folder."""
        source = Path(os.path.abspath(path))  # lexical: "../etc/mta.toml" -> "/x/etc/mta.toml"
        try:
            data = tomllib.loads(source.read_bytes().decode("utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {source}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {source}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {source}: invalid TOML: {exc}") from None
        config = cls.from_mapping(data, base_dir=source.parent)
        return dataclasses.replace(config, source=source)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base_dir: Path) -> Config:
        """Check an already parsed TOML document; relative paths resolve against *base_dir*."""
        return _Loader(Path(os.path.abspath(base_dir))).load(data)

    @classmethod
    def default(cls) -> Config:
        """The development setup of SPEC §2: what an empty config file gives, from the cwd."""
        return cls.from_mapping({}, base_dir=Path.cwd())

    @property
    def queue_path(self) -> Path:
        return self.state_dir / "queue.sqlite3"

    @property
    def generated_cert_paths(self) -> tuple[Path, Path]:
        """Where the self-signed (cert, key) pair lives when [tls] names none."""
        return self.state_dir / "tls" / "cert.pem", self.state_dir / "tls" / "key.pem"

    def with_overrides(
        self,
        *,
        listen: Sequence[str] | None = None,
        state_dir: Path | None = None,
        log_level: str | None = None,
        log_file: Path | None = None,
    ) -> Config:
        """Apply ``serve``'s command-line flags (SPEC §2); relative paths are against the cwd.

        ``--listen`` replaces every ``[[listen]]``; ``--state-dir`` also moves maildir_root
        and users_file unless the file set them. Bad values raise :class:`ConfigError`
        naming the flag.
        """
        errors: list[str] = []
        changes: dict[str, Any] = {}
        if listen is not None:
            listeners = []
            for text in listen:
                try:
                    listeners.append(ListenConfig.parse(text))
                except ValueError as exc:
                    errors.append(f"--listen {show(text)}: {exc}")
            for index in _duplicates(listeners):
                errors.append(f"--listen: {listeners[index].address} is given more than once")
            changes["listen"] = tuple(listeners)
        if log_level is not None:
            try:
                level = schema.choice(get_args(LogLevel))(log_level.lower())
                changes["log"] = dataclasses.replace(self.log, level=level)
            except ValueError as exc:
                errors.append(f"--log-level: {exc}, got {show(log_level)}")
        if log_file is not None:
            log = changes.get("log", self.log)
            changes["log"] = dataclasses.replace(log, file=Path(os.path.abspath(log_file)))
        if state_dir is not None:
            new_state = Path(os.path.abspath(state_dir))
            changes["state_dir"] = new_state
            if "maildir_root" in self._derived:
                changes["local"] = dataclasses.replace(self.local, maildir_root=new_state / "mail")
            if "users_file" in self._derived:
                changes["auth"] = AuthConfig(users_file=new_state / "passwd")
        if errors:
            raise ConfigError(errors)
        return dataclasses.replace(self, **changes)

    def describe_listeners(self) -> list[str]:
        """One line per listener for ``check-config``: ``127.0.0.1:2525 smtp (STARTTLS)``."""
        return [listener.describe() for listener in self.listen]


def _duplicates(listeners: Sequence[ListenConfig]) -> list[int]:
    """Indexes of listeners whose address an earlier one already binds.

    Port 0 is exempt: the kernel picks a new port each time (tests).
    """
    seen: set[tuple[str, int]] = set()
    duplicates = []
    for index, listener in enumerate(listeners):
        try:
            host = str(ip_address(listener.host))  # "::1" and "0::1" are one address
        except ValueError:
            host = listener.host.lower()
        if listener.port and (host, listener.port) in seen:
            duplicates.append(index)
        seen.add((host, listener.port))
    return duplicates


class _Loader:
    """One pass over a TOML document; each ``_section`` method mirrors one table of SPEC §3."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.errors: list[str] = []
        self.path = schema.path_under(base_dir)
        self.optional_path = schema.optional_path_under(base_dir)
        self.derived: set[str] = set()

    def load(self, data: Mapping[str, Any]) -> Config:
        root = Table("", data, self.errors)
        hostname = root.get("hostname", schema.hostname, None) or default_hostname()
        state_dir = root.get("state_dir", self.path, self.base_dir / DEFAULT_STATE_DIR)
        config = Config(
            hostname=hostname,
            state_dir=state_dir,
            listen=self._listen(root.raw("listen")),
            tls=self._tls(root.table("tls", "[tls]")),
            local=self._local(root.table("local", "[local]"), state_dir),
            relay=self._relay(root.table("relay", "[relay]")),
            dns=self._dns(root.table("dns", "[dns]")),
            queue=self._queue(root.table("queue", "[queue]")),
            limits=self._limits(root.table("limits", "[limits]")),
            auth=self._auth(root.table("auth", "[auth]"), state_dir),
            metrics=self._metrics(root.table("metrics", "[metrics]")),
            log=self._log(root.table("log", "[log]")),
            server=self._server(root.table("server", "[server]")),
            dkim=self._dkim(root.table("dkim", "[dkim]")),
            verify=self._verify(root.table("verify", "[verify]")),
            user=root.get("user", schema.system_user, None),
            group=root.get("group", schema.system_group, None),
            milters=self._milters(root.raw("milter")),
            _derived=frozenset(self.derived),
        )
        if config.group is not None and root.raw("user") is None:
            root.error("group", "only applies with user (the account to switch to)")
        root.close()
        if self.errors:
            raise ConfigError(self.errors)
        return config

    def _listen(self, raw: Any) -> tuple[ListenConfig, ...]:
        if raw is None:
            return DEFAULT_LISTENERS
        if not isinstance(raw, list) or not all(isinstance(item, Mapping) for item in raw):
            self.errors.append(f"listen: must be an array of [[listen]] tables, got {show(raw)}")
            return ()
        listeners: list[ListenConfig] = []
        labels: list[str] = []
        for index, item in enumerate(raw, 1):
            table = Table(f"[[listen]][{index}]", item, self.errors)
            address = table.get("address", schema.host_port, None)
            mode: ListenMode = table.get("mode", schema.choice(_MODES), "smtp")
            if table.raw("address") is None:
                table.error("address", 'missing (write "host:port")')
            proxy_protocol, proxy_from = _proxy_settings(table)
            table.close()
            if address is not None:
                listeners.append(
                    ListenConfig(address[0], address[1], mode, proxy_protocol, proxy_from)
                )
                labels.append(table.name("address"))
        for index in _duplicates(listeners):
            self.errors.append(
                f"{labels[index]}: {listeners[index].address} is already a listener above"
            )
        return tuple(listeners)

    def _milters(self, raw: Any) -> tuple[MilterSpec, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list) or not all(isinstance(item, Mapping) for item in raw):
            self.errors.append(f"milter: must be an array of [[milter]] tables, got {show(raw)}")
            return ()
        milters: list[MilterSpec] = []
        for index, item in enumerate(raw, 1):
            table = Table(f"[[milter]][{index}]", item, self.errors)
            address = table.get("address", schema.milter_address, None)
            timeout = table.get("timeout", schema.positive_duration, 30.0)
            on_error = table.get("on_error", schema.choice(("tempfail", "accept")), "tempfail")
            reuse = table.get("reuse_connections", schema.boolean, False)
            if table.raw("address") is None:
                table.error("address", 'missing (write "host:port" or "unix:/path")')
            table.close()
            if address is not None:
                milters.append(MilterSpec(address, timeout, on_error, reuse))
        return tuple(milters)

    def _tls(self, table: Table) -> TlsConfig:
        tls = TlsConfig(
            cert=table.get("cert", self.optional_path, None),
            key=table.get("key", self.optional_path, None),
        )
        table.close()
        if tls.cert is not None and tls.key is None and table.raw("key") in (None, ""):
            table.error("key", "required when [tls].cert is set")
        if tls.key is not None and tls.cert is None and table.raw("cert") in (None, ""):
            table.error("cert", "required when [tls].key is set")
        return tls

    def _local(self, table: Table, state_dir: Path) -> LocalConfig:
        domains = tuple(dict.fromkeys(table.get_list("domains", schema.domain, ["localhost"])))
        if table.raw("domains") == []:
            table.error("domains", "must list at least one domain")
        maildir_root = table.get("maildir_root", self.path, None)
        if maildir_root is None:
            maildir_root = state_dir / "mail"
            if table.raw("maildir_root") is None:
                self.derived.add("maildir_root")
        mailboxes_file = table.get("mailboxes_file", self.optional_path, None)
        deliver_at_once = table.get("deliver_at_once", schema.boolean, True)
        lmtp = table.get("lmtp", schema.lmtp_target, None)
        maildir_group = table.get("maildir_group", schema.group_id, None)
        maps = MailMaps(domains, self.errors)
        if mailboxes_file is not None:
            maps.read_file(mailboxes_file)
        if table.raw("mailboxes") is not None:
            maps.read_inline(table.table("mailboxes", "[local.mailboxes]"))
        if table.raw("aliases") is not None:
            maps.read_aliases(table.table("aliases", "[local.aliases]"))
        table.close()
        maps.check_aliases()
        return LocalConfig(
            domains=domains,
            maildir_root=maildir_root,
            mailboxes_file=mailboxes_file,
            mailboxes=None if maps.mailboxes is None else MappingProxyType(maps.mailboxes),
            aliases=MappingProxyType(maps.aliases),
            deliver_at_once=deliver_at_once,
            lmtp=lmtp,
            maildir_group=maildir_group,
        )

    def _relay(self, table: Table) -> RelayConfig:
        d = RelayConfig()
        networks = table.get_list("trusted_networks", schema.ip_network, list(d.trusted_networks))
        smarthost_tls = table.get(
            "smarthost_tls", schema.choice(get_args(SmarthostTls)), d.smarthost_tls
        )
        relay = RelayConfig(
            trusted_networks=tuple(networks),
            tls=table.get("tls", schema.choice(get_args(OutboundTls)), d.tls),
            ca_file=table.get("ca_file", self.optional_path, None),
            port=table.get("port", schema.remote_port, d.port),
            smarthost=table.get("smarthost", _smarthost, ""),
            smarthost_tls=smarthost_tls,
            smarthost_auth=table.get("smarthost_auth", _credentials, "", secret=True),
            prefer_ipv4=table.get("prefer_ipv4", schema.boolean, d.prefer_ipv4),
            mta_sts=table.get("mta_sts", schema.boolean, d.mta_sts),
            dane=table.get("dane", schema.boolean, d.dane),
            mta_sts_port=table.get("mta_sts_port", schema.remote_port, d.mta_sts_port),
        )
        table.close()
        return relay

    def _dns(self, table: Table) -> DnsConfig:
        dns = DnsConfig(
            nameservers=tuple(table.get_list("nameservers", schema.nameserver, [])),
            timeout=table.get("timeout", schema.positive_duration, DnsConfig.timeout),
        )
        table.close()
        return dns

    def _queue(self, table: Table) -> QueueConfig:
        d = QueueConfig()
        duration = schema.positive_duration
        queue = QueueConfig(
            retry_initial=table.get("retry_initial", duration, d.retry_initial),
            retry_max=table.get("retry_max", duration, d.retry_max),
            max_age=table.get("max_age", duration, d.max_age),
            concurrency=table.get("concurrency", schema.positive_int, d.concurrency),
            delay_warning=table.get("delay_warning", duration, d.delay_warning),
        )
        table.close()
        if queue.retry_initial > queue.retry_max:
            table.error(
                "retry_initial",
                f"must not exceed [queue].retry_max ({format_duration(queue.retry_initial)} > "
                f"{format_duration(queue.retry_max)})",
            )
        return queue

    def _limits(self, table: Table) -> LimitsConfig:
        d = LimitsConfig()
        count, duration = schema.positive_int, schema.positive_duration
        limits = LimitsConfig(
            max_message_size=table.get("max_message_size", count, d.max_message_size),
            max_recipients=table.get("max_recipients", count, d.max_recipients),
            max_connections=table.get("max_connections", count, d.max_connections),
            max_connections_per_ip=table.get(
                "max_connections_per_ip", count, d.max_connections_per_ip
            ),
            command_timeout=table.get("command_timeout", duration, d.command_timeout),
            data_timeout=table.get("data_timeout", duration, d.data_timeout),
        )
        table.close()
        return limits

    def _auth(self, table: Table, state_dir: Path) -> AuthConfig:
        users_file = table.get("users_file", self.path, None)
        if users_file is None:
            users_file = state_dir / "passwd"
            if table.raw("users_file") is None:
                self.derived.add("users_file")
        table.close()
        return AuthConfig(users_file=users_file)

    def _metrics(self, table: Table) -> MetricsConfig:
        metrics = MetricsConfig(listen=table.get("listen", _optional_host_port, ""))
        table.close()
        return metrics

    def _server(self, table: Table) -> ServerConfig:
        server = ServerConfig(workers=table.get("workers", _workers, ServerConfig.workers))
        table.close()
        return server

    def _log(self, table: Table) -> LogConfig:
        log = LogConfig(
            level=table.get("level", schema.choice(get_args(LogLevel)), LogConfig.level),
            file=table.get("file", self.optional_path, None),
            format=table.get("format", schema.choice(get_args(LogFormat)), LogConfig.format),
        )
        table.close()
        return log

    def _dkim(self, table: Table) -> DkimConfig:
        raw = table.raw("sign")
        table.close()
        if raw is None:
            return DkimConfig()
        if not isinstance(raw, list) or not all(isinstance(item, Mapping) for item in raw):
            table.error("sign", f"must be an array of [[dkim.sign]] tables, got {show(raw)}")
            return DkimConfig()
        # Loaded here, not at import: cryptography is only needed when keys are
        # configured, and the [server] workers supervisor loads the config too.
        from trio_mta.auth.keys import DkimKeyError, load_key

        keys: list[DkimKey] = []
        seen: set[tuple[str, str]] = set()
        for index, item in enumerate(raw, 1):
            entry = Table(f"[[dkim.sign]][{index}]", item, self.errors)
            domain = entry.get("domain", schema.domain, None)
            selector = entry.get("selector", _selector, None)
            path = entry.get("key", self.path, None)
            for key in ("domain", "selector", "key"):
                if entry.raw(key) is None:
                    entry.error(key, "missing")
            entry.close()
            if domain is None or selector is None or path is None:
                continue
            if (domain, selector) in seen:
                entry.error("selector", f"{selector} of {domain} is already an entry above")
                continue
            seen.add((domain, selector))
            try:
                keys.append(load_key(path, domain, selector))
            except DkimKeyError as exc:
                entry.error("key", str(exc))
        return DkimConfig(sign=tuple(keys))

    def _verify(self, table: Table) -> VerifyConfig:
        d = VerifyConfig()
        flag = schema.boolean
        verify = VerifyConfig(
            spf=table.get("spf", flag, d.spf),
            dkim=table.get("dkim", flag, d.dkim),
            dmarc=table.get("dmarc", flag, d.dmarc),
            dmarc_enforce=table.get("dmarc_enforce", flag, d.dmarc_enforce),
            spf_enforce=table.get("spf_enforce", flag, d.spf_enforce),
        )
        table.close()
        if verify.spf_enforce and not verify.spf:
            table.error("spf_enforce", "needs [verify].spf = true")
        if verify.dmarc_enforce and not verify.dmarc:
            table.error("dmarc_enforce", "needs [verify].dmarc = true")
        return verify


def _proxy_settings(table: Table) -> tuple[bool, tuple[IPv4Network | IPv6Network, ...]]:
    """``proxy_protocol`` and ``proxy_from`` of one [[listen]]: each needs the other.

    Without ``proxy_from`` anyone could claim any client address, trusted
    networks included, so a PROXY listener has to say whom it believes.
    """
    enabled = table.get("proxy_protocol", schema.boolean, False)
    networks = tuple(table.get_list("proxy_from", schema.ip_network, []))
    if enabled and not networks and table.raw("proxy_from") in (None, []):
        table.error(
            "proxy_from",
            'required when proxy_protocol = true (the proxies\' addresses, e.g. ["127.0.0.1/32"])',
        )
    if not enabled and table.raw("proxy_from") is not None:
        table.error("proxy_from", "only applies with proxy_protocol = true")
    return enabled, networks


def _workers(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WORKERS:
        raise ValueError(f"must be an integer 0..{MAX_WORKERS} (0: one per CPU core)")
    return value


def _optional_host_port(value: Any) -> str:
    if value != "":
        schema.host_port(value)
    return str(value)


def _smarthost(value: Any) -> str:
    if value == "":
        return ""
    hint = 'must be "host", "host:port" or "[ipv6]:port"'
    if not isinstance(value, str):
        raise ValueError(hint)
    if schema.parse_host_port(value, default_port=25)[1] == 0:
        raise ValueError(hint + " with a port 1..65535")
    return value


def _credentials(value: Any) -> str:
    if value == "":
        return ""
    if not isinstance(value, str) or ":" not in value or value.startswith(":"):
        raise ValueError('must be "user:password" (value not shown)')
    return value


def _selector(value: Any) -> str:
    """A DKIM selector: dot-separated DNS labels (RFC 6376 §3.1)."""
    if not isinstance(value, str) or not schema.is_hostname(value):
        raise ValueError("must be a DNS label like s2026")
    return value
