"""trio_mta.config: SPEC §3 keys and defaults, errors that name the key, overrides, durations."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from ipaddress import ip_network
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mta.config.checks import open_relay_warning, writable_file_problem
from trio_mta.config.durations import format_duration, parse_duration
from trio_mta.config.loader import (
    Config,
    ConfigError,
    DnsConfig,
    ListenConfig,
    TlsConfig,
    default_hostname,
)
from trio_mta.config.schema import format_host_port, parse_host_port

BASE = Path("/etc/trio-mta")


def write(tmp_path: Path, text: str, name: str = "mta.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Config:
    return Config.load(write(tmp_path, text))


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.errors


def only_error(tmp_path: Path, text: str) -> str:
    found = errors(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


def mapping_errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data, base_dir=BASE)
    return info.value.errors


# -- defaults ---------------------------------------------------------------------------------


def test_empty_file_gives_the_spec_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    state = tmp_path / "trio-mta-data"
    assert config.source == tmp_path / "mta.toml"
    assert config.hostname == default_hostname()
    assert config.state_dir == state
    assert [(lc.host, lc.port, lc.mode) for lc in config.listen] == [
        ("127.0.0.1", 2525, "smtp"),
        ("127.0.0.1", 2587, "submission"),
        ("127.0.0.1", 2465, "smtps"),
    ]
    assert config.tls.cert is None and config.tls.key is None
    assert config.local.domains == ("localhost",)
    assert config.local.maildir_root == state / "mail"
    assert config.local.mailboxes_file is None
    assert config.local.mailboxes is None  # no map: every local part is a mailbox
    assert dict(config.local.aliases) == {}
    relay = config.relay
    assert relay.trusted_networks == (ip_network("127.0.0.0/8"), ip_network("::1/128"))
    assert (relay.tls, relay.ca_file, relay.port) == ("opportunistic", None, 25)
    assert (relay.smarthost, relay.smarthost_tls, relay.smarthost_auth) == ("", "starttls", "")
    assert relay.prefer_ipv4 is False
    assert relay.smarthost_address is None and relay.smarthost_credentials is None
    assert config.dns.nameservers == () and config.dns.timeout == 5.0
    queue = config.queue
    assert (queue.retry_initial, queue.retry_max, queue.max_age) == (300.0, 3600.0, 432000.0)
    assert queue.concurrency == 20
    assert queue.delay_warning == 4 * 3600.0  # RFC 3461 NOTIFY=DELAY, SPEC §11
    limits = config.limits
    assert limits.max_message_size == 36700160
    assert (limits.max_recipients, limits.max_connections, limits.max_connections_per_ip) == (
        100,
        1000,
        20,
    )
    assert (limits.command_timeout, limits.data_timeout) == (300.0, 600.0)
    assert config.auth.users_file == state / "passwd"
    assert config.metrics.listen == "" and config.metrics.address is None
    assert (config.log.level, config.log.file, config.log.format) == ("info", None, "text")
    assert config.queue_path == state / "queue.sqlite3"
    assert config.generated_cert_paths == (state / "tls" / "cert.pem", state / "tls" / "key.pem")


def test_default_is_the_empty_config_relative_to_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = Config.default()
    assert config == dataclasses.replace(load(tmp_path, ""), source=None)
    assert config.state_dir == tmp_path / "trio-mta-data"
    assert config.source is None
    assert config.describe_listeners() == [
        "127.0.0.1:2525 smtp (STARTTLS)",
        "127.0.0.1:2587 submission (STARTTLS, AUTH required)",
        "127.0.0.1:2465 smtps (implicit TLS, AUTH required)",
    ]


def test_default_hostname_is_a_host_name() -> None:
    name = default_hostname()
    assert name and " " not in name
    assert Config.from_mapping({}, base_dir=BASE).hostname == name


SPEC_EXAMPLE = """\
hostname = "mx.example.org"
state_dir = "data"

[[listen]]
address = "0.0.0.0:25"
mode = "smtp"

[[listen]]
address = "[::1]:587"
mode = "submission"

[tls]
cert = "fullchain.pem"
key = "privkey.pem"

[local]
domains = ["example.org"]
maildir_root = "mail"
mailboxes_file = "mailboxes"
[local.mailboxes]
"alice@example.org" = "alice"
[local.aliases]
"postmaster@example.org" = ["alice@example.org"]

[relay]
trusted_networks = ["127.0.0.0/8", "::1/128"]
tls = "opportunistic"
ca_file = ""
port = 25
smarthost = ""
smarthost_tls = "starttls"
smarthost_auth = ""

[dns]
nameservers = []
timeout = "5s"

[queue]
retry_initial = "5m"
retry_max = "1h"
max_age = "5d"
concurrency = 20

[limits]
max_message_size = 36700160
max_recipients = 100
max_connections = 1000
max_connections_per_ip = 20
command_timeout = "5m"
data_timeout = "10m"

[auth]
users_file = "passwd"

[metrics]
listen = ""

[log]
level = "info"
file = ""
format = "text"
"""


def test_spec_example_loads_with_paths_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "mailboxes").write_text("bob@example.org  bob\n")
    write(folder, SPEC_EXAMPLE)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = Config.load(Path("..") / "etc" / "mta.toml")
    assert config.source == folder / "mta.toml"
    assert config.hostname == "mx.example.org"
    assert config.state_dir == folder / "data"
    assert config.tls == TlsConfig(folder / "fullchain.pem", folder / "privkey.pem")
    assert config.local.maildir_root == folder / "mail"  # not <state_dir>/mail
    assert config.local.mailboxes_file == folder / "mailboxes"
    assert config.auth.users_file == folder / "passwd"
    assert dict(config.local.mailboxes or {}) == {
        "alice@example.org": "alice",
        "bob@example.org": "bob",
    }
    assert dict(config.local.aliases) == {"postmaster@example.org": ("alice@example.org",)}
    assert config.relay.ca_file is None and config.log.file is None
    assert config.describe_listeners() == [
        "0.0.0.0:25 smtp (STARTTLS)",
        "[::1]:587 submission (STARTTLS, AUTH required)",
    ]
    # every other value is the documented default
    defaults = Config.from_mapping({}, base_dir=folder)
    for section in ("relay", "dns", "queue", "limits", "metrics"):
        assert getattr(config, section) == getattr(defaults, section), section
    assert config.log == defaults.log


def test_from_mapping_accepts_any_mapping() -> None:
    data = MappingProxyType({"limits": MappingProxyType({"max_recipients": 5})})
    assert Config.from_mapping(data, base_dir=BASE).limits.max_recipients == 5


def test_absolute_paths_stay_absolute(tmp_path: Path) -> None:
    config = Config.from_mapping(
        {"state_dir": str(tmp_path / "s"), "log": {"file": "/var/log/mta.log"}}, base_dir=BASE
    )
    assert config.state_dir == tmp_path / "s"
    assert config.local.maildir_root == tmp_path / "s" / "mail"
    assert config.log.file == Path("/var/log/mta.log")


def test_from_mapping_resolves_against_base_dir() -> None:
    config = Config.from_mapping(
        {"state_dir": "st", "tls": {"cert": "c.pem", "key": "k.pem"}}, base_dir=BASE
    )
    assert config.state_dir == BASE / "st"
    assert (config.tls.cert, config.tls.key) == (BASE / "c.pem", BASE / "k.pem")
    assert config.source is None


# -- values -----------------------------------------------------------------------------------


def test_values_are_typed_and_normalised(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [[listen]]
        address = "[::1]:0"
        mode = "smtps"
        [[listen]]
        address = "localhost:0"
        [local]
        domains = ["Example.ORG", "example.org", "b.example"]
        [local.aliases]
        "Info@Example.org" = "Bob@Remote.EXAMPLE"
        [relay]
        trusted_networks = ["10.1.2.3/8", "2001:db8::1/32"]
        smarthost = "[2001:db8::25]"
        smarthost_tls = "implicit"
        smarthost_auth = "me:pa:ss"
        prefer_ipv4 = true
        [dns]
        nameservers = ["127.0.0.1:5353", "::1", "[::1]:54", "192.0.2.1"]
        timeout = 2.5
        [queue]
        retry_initial = 30
        retry_max = "1h30m"
        [limits]
        command_timeout = "90"
        [metrics]
        listen = "127.0.0.1:9125"
        [log]
        level = "debug"
        format = "json"
        file = "mta.log"
        """,
    )
    assert config.listen == (
        ListenConfig("::1", 0, "smtps"),
        ListenConfig("localhost", 0, "smtp"),  # mode defaults to smtp
    )
    assert config.listen[0].address == "[::1]:0"
    assert config.local.domains == ("example.org", "b.example")
    assert dict(config.local.aliases) == {"info@example.org": ("Bob@remote.example",)}
    assert config.relay.trusted_networks == (ip_network("10.0.0.0/8"), ip_network("2001:db8::/32"))
    assert config.relay.smarthost_address == ("2001:db8::25", 465)
    assert config.relay.smarthost_credentials == ("me", "pa:ss")
    assert config.relay.prefer_ipv4 is True
    assert config.dns == DnsConfig(
        nameservers=(("127.0.0.1", 5353), ("::1", 53), ("::1", 54), ("192.0.2.1", 53)),
        timeout=2.5,
    )
    assert (config.queue.retry_initial, config.queue.retry_max) == (30.0, 5400.0)
    assert isinstance(config.queue.retry_initial, float)
    assert config.limits.command_timeout == 90.0
    assert config.metrics.address == ("127.0.0.1", 9125)
    assert (config.log.level, config.log.format) == ("debug", "json")
    assert config.log.file == tmp_path / "mta.log"


@pytest.mark.parametrize(
    ("smarthost", "tls", "expected"),
    [
        ("relay.example.net", "starttls", ("relay.example.net", 25)),
        ("relay.example.net", "implicit", ("relay.example.net", 465)),
        ("relay.example.net:587", "starttls", ("relay.example.net", 587)),
        ("192.0.2.7:2525", "none", ("192.0.2.7", 2525)),
    ],
)
def test_smarthost_address(smarthost: str, tls: str, expected: tuple[str, int]) -> None:
    data = {"relay": {"smarthost": smarthost, "smarthost_tls": tls}}
    assert Config.from_mapping(data, base_dir=BASE).relay.smarthost_address == expected


def test_config_is_immutable() -> None:
    config = Config.from_mapping(
        {"local": {"mailboxes": {"a@localhost": "a"}, "aliases": {"b@localhost": ["a@localhost"]}}},
        base_dir=BASE,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hostname = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.local.aliases["c@localhost"] = ()  # type: ignore[index]
    with pytest.raises(TypeError):
        config.local.mailboxes["c@localhost"] = "c"  # type: ignore[index]


# -- mailbox maps -----------------------------------------------------------------------------


def test_mailboxes_file_and_inline_map_merge(tmp_path: Path) -> None:
    (tmp_path / "mailboxes").write_text(
        "# who gets what\n"
        "\n"
        "Carol@Example.org   carol   # trailing comment\n"
        "   \t  \n"
        "dave@example.org\tdave.smith\n"
        "alice@example.org alice\n"  # same as inline: fine
    )
    config = load(
        tmp_path,
        """
        [local]
        domains = ["example.org"]
        mailboxes_file = "mailboxes"
        [local.mailboxes]
        "ALICE@example.org" = "alice"
        """,
    )
    assert config.local.mailboxes_file == tmp_path / "mailboxes"
    assert dict(config.local.mailboxes or {}) == {
        "carol@example.org": "carol",
        "dave@example.org": "dave.smith",
        "alice@example.org": "alice",
    }


def test_empty_mailboxes_file_is_an_empty_map_not_catch_all(tmp_path: Path) -> None:
    (tmp_path / "mailboxes").write_text("# nobody yet\n")
    config = load(tmp_path, '[local]\nmailboxes_file = "mailboxes"\n')
    assert config.local.mailboxes == {}


def test_mailboxes_file_errors_name_the_key_and_line(tmp_path: Path) -> None:
    (tmp_path / "mb").write_text(
        "ok@localhost ok\n"
        "only-one-field\n"
        "a@localhost b c\n"
        "x@elsewhere.example x\n"
        "evil@localhost ../etc\n"
        "ok@localhost other\n"
        "not-an-address mailbox\n"
    )
    where = f"[local].mailboxes_file: {tmp_path / 'mb'}"
    assert errors(tmp_path, '[local]\nmailboxes_file = "mb"\n') == [
        f'{where} line 2: expected "address mailbox-name", got "only-one-field"',
        f'{where} line 3: expected "address mailbox-name", got "a@localhost b c"',
        f"{where} line 4: domain elsewhere.example is not in [local].domains",
        f'{where} line 5: mailbox name must not contain "/", got "../etc"',
        f'{where} line 6: ok@localhost is already mapped to "ok" ({where} line 1)',
        f"{where} line 7: must be an address local@domain",
    ]


def test_unreadable_mailboxes_file_is_one_line(tmp_path: Path) -> None:
    message = only_error(tmp_path, '[local]\nmailboxes_file = "missing"\n')
    assert message == (
        f"[local].mailboxes_file: cannot read {tmp_path / 'missing'}: No such file or directory"
    )


def test_mailboxes_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "mb").write_bytes(b"a@localhost \xff\n")
    assert only_error(tmp_path, '[local]\nmailboxes_file = "mb"\n') == (
        f"[local].mailboxes_file: {tmp_path / 'mb'} is not UTF-8 text"
    )


UNSAFE_NAMES = [
    "../x",
    "a/b",
    "a\\b",
    "%2e%2e",
    "a%2fb",
    "a\x00b",
    "a\nb",
    "a\x7fb",
    ".",
    "..",
    ".hidden",
    "",
    "x" * 256,
    "é" * 128,
]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_mailbox_names_in_the_map_are_errors(name: str) -> None:
    (message,) = mapping_errors({"local": {"mailboxes": {"a@localhost": name}}})
    assert message.startswith('[local.mailboxes]."a@localhost": mailbox name ')


def test_inline_map_errors_name_the_entry() -> None:
    found = mapping_errors(
        {
            "local": {
                "domains": ["example.org"],
                "mailboxes": {
                    "a@example.org": 5,
                    "b@other.example": "b",
                    "no-at-sign": "c",
                    "sp ace@example.org": "d",
                    "Dup@example.org": "one",
                    "dup@example.org": "two",
                },
            }
        }
    )
    assert found == [
        '[local.mailboxes]."a@example.org": the mailbox name must be a string, got 5',
        '[local.mailboxes]."b@other.example": domain other.example is not in [local].domains',
        "[local.mailboxes].no-at-sign: must be an address local@domain",
        '[local.mailboxes]."sp ace@example.org": must be an address local@domain',
        '[local.mailboxes]."dup@example.org": dup@example.org is already mapped to "one" '
        '([local.mailboxes]."Dup@example.org")',
    ]


# -- aliases ----------------------------------------------------------------------------------


def test_alias_checks_at_load() -> None:
    found = mapping_errors(
        {
            "local": {
                "domains": ["example.org"],
                "mailboxes": {"alice@example.org": "alice"},
                "aliases": {
                    "list@example.org": ["alice@example.org", "ghost@example.org"],
                    "empty@example.org": [],
                    "num@example.org": 5,
                    "bad@example.org": ["alice@example.org", "not an address", 7],
                    "far@remote.example": ["alice@example.org"],
                    # b loops back to itself through a; b has no mailbox, so mail for b
                    # would vanish: refused. a is fine (it loops back to a, a mailbox).
                    "alice@example.org": ["b@example.org"],
                    "b@example.org": ["alice@example.org"],
                },
            }
        }
    )
    assert found == [
        '[local.aliases]."empty@example.org": must be a non-empty array of addresses, got an array',
        '[local.aliases]."num@example.org": must be a non-empty array of addresses, got 5',
        '[local.aliases]."bad@example.org"[2]: must be an address local@domain, '
        'got "not an address"',
        '[local.aliases]."bad@example.org"[3]: must be an address local@domain, got 7',
        '[local.aliases]."far@remote.example": domain remote.example is not in [local].domains',
        '[local.aliases]."list@example.org": "ghost@example.org" is neither a mailbox nor an alias',
        '[local.aliases]."b@example.org": expands to no mailbox or remote address',
    ]


def test_alias_to_unsafe_catch_all_name() -> None:
    (message,) = mapping_errors({"local": {"aliases": {"a@localhost": ["%2e%2e@localhost"]}}})
    assert message == (
        '[local.aliases]."a@localhost": "%2e%2e@localhost" is not a safe mailbox: '
        'mailbox name must not contain "%"'
    )


def test_alias_nesting_limit() -> None:
    chain = {f"a{i}@localhost": [f"a{i + 1}@localhost"] for i in range(150)}
    found = mapping_errors({"local": {"aliases": chain}})
    assert '[local.aliases]."a0@localhost": aliases nest more than 100 levels deep' in found
    assert all("nest more than 100 levels" in line for line in found)


def test_duplicate_alias_keys_differing_in_case() -> None:
    found = mapping_errors(
        {"local": {"aliases": {"A@localhost": ["x@localhost"], "a@localhost": ["y@localhost"]}}}
    )
    assert found == [
        '[local.aliases]."a@localhost": a@localhost is already an alias '
        '([local.aliases]."A@localhost")'
    ]


# -- errors: one per problem, each naming its key --------------------------------------------

LEVELS = "must be one of debug, info, warning, error"
ERROR_CASES: list[tuple[str, str]] = [
    ('hostname = "bad host"', 'hostname: must be a host name like mx.example.org, got "bad host"'),
    ("hostname = 5", "hostname: must be a host name like mx.example.org, got 5"),
    (
        'hostname = "-x.example"',
        'hostname: must be a host name like mx.example.org, got "-x.example"',
    ),
    ('state_dir = ""', 'state_dir: must be a non-empty path, got ""'),
    ("state_dir = []", "state_dir: must be a non-empty path, got an array"),
    ("colour = 1", "unknown key colour"),
    ("[colour]\nx = 1", "unknown key colour"),
    ("relay = 5", "[relay]: must be a table, got 5"),
    ('listen = "0.0.0.0:25"', 'listen: must be an array of [[listen]] tables, got "0.0.0.0:25"'),
    (
        '[[listen]]\naddress = "0.0.0.0:25"\nmode = "pop3"',
        '[[listen]][1].mode: must be one of smtp, submission, smtps, got "pop3"',
    ),
    ('[[listen]]\nmode = "smtp"', '[[listen]][1].address: missing (write "host:port")'),
    (
        '[[listen]]\naddress = "::1:25"',
        '[[listen]][1].address: must be "host:port" or "[ipv6]:port" '
        '(write IPv6 addresses as "[::1]:25"), got "::1:25"',
    ),
    (
        '[[listen]]\naddress = "host:70000"',
        '[[listen]][1].address: must be "host:port" or "[ipv6]:port" with a port 0..65535, '
        'got "host:70000"',
    ),
    (
        '[[listen]]\naddress = "0.0.0.0"',
        '[[listen]][1].address: must be "host:port" or "[ipv6]:port", got "0.0.0.0"',
    ),
    (
        '[[listen]]\naddress = "a:1"\n[[listen]]\naddress = "a:2"\nport = 2',
        "unknown key [[listen]][2].port",
    ),
    (
        '[[listen]]\naddress = "[::1]:25"\n[[listen]]\naddress = "[0::1]:25"\nmode = "smtps"',
        "[[listen]][2].address: [0::1]:25 is already a listener above",
    ),
    ('[tls]\ncert = "c.pem"', "[tls].key: required when [tls].cert is set"),
    ('[tls]\nkey = "k.pem"\ncert = ""', "[tls].cert: required when [tls].key is set"),
    ('[tls]\ncert = 1\nkey = "k"', "[tls].cert: must be a non-empty path, got 1"),
    ('[tls]\nciphers = "x"', "unknown key [tls].ciphers"),
    ('[local]\ndomains = "example.org"', '[local].domains: must be an array, got "example.org"'),
    (
        '[local]\ndomains = ["ok.example", "not ok"]',
        '[local].domains[2]: must be a domain name like example.org, got "not ok"',
    ),
    ("[local]\ndomains = []", "[local].domains: must list at least one domain"),
    ("[local]\nmaildir_root = 5", "[local].maildir_root: must be a non-empty path, got 5"),
    ("[local]\nmailboxes = 5", "[local.mailboxes]: must be a table, got 5"),
    ('[local]\naliases = ["x"]', "[local.aliases]: must be a table, got an array"),
    ("[local]\ndomain = []", "unknown key [local].domain (did you mean domains?)"),
    (
        '[relay]\ntrusted_networks = ["10.0.0.0/8", "nope"]',
        '[relay].trusted_networks[2]: must be an IP network like "10.0.0.0/8" or "::1/128", '
        'got "nope"',
    ),
    (
        '[relay]\ntls = "always"',
        '[relay].tls: must be one of none, opportunistic, required, verify, got "always"',
    ),
    ("[relay]\nport = 0", "[relay].port: must be a port number 1..65535, got 0"),
    ("[relay]\nport = 65536", "[relay].port: must be a port number 1..65535, got 65536"),
    ("[relay]\nport = true", "[relay].port: must be a port number 1..65535, got true"),
    ('[relay]\nport = "25"', '[relay].port: must be a port number 1..65535, got "25"'),
    (
        '[relay]\nsmarthost = "a b"',
        '[relay].smarthost: must be "host", "host:port" or "[ipv6]:port", got "a b"',
    ),
    (
        '[relay]\nsmarthost = "relay.example:0"',
        '[relay].smarthost: must be "host", "host:port" or "[ipv6]:port" with a port 1..65535, '
        'got "relay.example:0"',
    ),
    (
        '[relay]\nsmarthost_tls = "ssl"',
        '[relay].smarthost_tls: must be one of starttls, implicit, none, got "ssl"',
    ),
    ('[relay]\nprefer_ipv4 = "yes"', '[relay].prefer_ipv4: must be true or false, got "yes"'),
    ('[relay]\nsmarthst = "x"', "unknown key [relay].smarthst (did you mean smarthost?)"),
    (
        '[dns]\nnameservers = ["dns.example"]',
        '[dns].nameservers[1]: must be an IP address with optional port: "127.0.0.1:5353", '
        '"::1", "[::1]:53", got "dns.example"',
    ),
    (
        '[dns]\ntimeout = "5 seconds"',
        '[dns].timeout: must be a duration: seconds, or a string like "30s", "5m", "2h", "5d", '
        '"1h30m", got "5 seconds"',
    ),
    ("[dns]\ntimeout = 0", "[dns].timeout: must be a duration greater than zero, got 0"),
    (
        '[queue]\nretry_initial = "2h"',
        "[queue].retry_initial: must not exceed [queue].retry_max (2h > 1h)",
    ),
    ("[queue]\nconcurrency = 0", "[queue].concurrency: must be a positive integer, got 0"),
    (
        '[queue]\ndelay_warning = "soon"',
        '[queue].delay_warning: must be a duration: seconds, or a string like "30s", "5m", '
        '"2h", "5d", "1h30m", got "soon"',
    ),
    ("[queue]\nconcurrency = 2.5", "[queue].concurrency: must be a positive integer, got 2.5"),
    (
        "[queue]\nmax_age = -1",
        '[queue].max_age: must be a duration: seconds, or a string like "30s", "5m", "2h", '
        '"5d", "1h30m", got -1',
    ),
    (
        '[limits]\nmax_recipients = "x"',
        '[limits].max_recipients: must be a positive integer, got "x"',
    ),
    (
        "[limits]\nmax_message_size = -1",
        "[limits].max_message_size: must be a positive integer, got -1",
    ),
    (
        "[limits]\nmax_connections = true",
        "[limits].max_connections: must be a positive integer, got true",
    ),
    (
        "[limits]\nmax_connections_per_ip = 0",
        "[limits].max_connections_per_ip: must be a positive integer, got 0",
    ),
    (
        '[limits]\ndata_timeout = "0s"',
        '[limits].data_timeout: must be a duration greater than zero, got "0s"',
    ),
    ('[auth]\nusers_file = ""', '[auth].users_file: must be a non-empty path, got ""'),
    (
        '[metrics]\nlisten = "9125"',
        '[metrics].listen: must be "host:port" or "[ipv6]:port", got "9125"',
    ),
    *[
        (f'[log]\nlevel = "{v}"', f'[log].level: {LEVELS}, got "{v}"')
        for v in ("loud", "INFO")  # values are case-sensitive, as everywhere in TOML
    ],
    ('[log]\nformat = "xml"', '[log].format: must be one of text, json, got "xml"'),
    ("[log]\nfile = 5", "[log].file: must be a non-empty path, got 5"),
]


@pytest.mark.parametrize(("toml", "expected"), ERROR_CASES, ids=[c[1][:60] for c in ERROR_CASES])
def test_each_error_names_its_key(tmp_path: Path, toml: str, expected: str) -> None:
    assert only_error(tmp_path, toml) == expected


def test_smarthost_auth_error_does_not_echo_the_secret(tmp_path: Path) -> None:
    message = only_error(tmp_path, '[relay]\nsmarthost_auth = "hunter2"')
    assert message == '[relay].smarthost_auth: must be "user:password" (value not shown)'
    assert "hunter2" not in message


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(
            tmp_path,
            """
            hostname = "bad host"
            typo = 1
            [[listen]]
            address = "x"
            mode = "pop3"
            [relay]
            port = 0
            [limits]
            max_recipients = "x"
            command_timeout = "soon"
            """,
        )
    exc = info.value
    assert len(exc.errors) == 7
    assert str(exc) == "\n".join(exc.errors)
    keys = [
        "hostname",
        "typo",
        "[[listen]][1].address",
        "[[listen]][1].mode",
        "[relay].port",
        "[limits].max_recipients",
        "[limits].command_timeout",
    ]
    text = str(exc)
    assert all(key in text for key in keys)
    assert "Traceback" not in text


def test_toml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[relay\nport = 25\n")
    with pytest.raises(ConfigError) as info:
        Config.load(path)
    (message,) = info.value.errors
    assert message.startswith(f"config file {path}: invalid TOML: ")
    assert "line 1" in message and "\n" not in message


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "No such file or directory"),
        (lambda p: p.mkdir(), "Is a directory"),
    ],
)
def test_unreadable_config_file_is_one_line(tmp_path: Path, make: Any, reason: str) -> None:
    path = tmp_path / "mta.toml"
    make(path)
    with pytest.raises(ConfigError) as info:
        Config.load(path)
    assert info.value.errors == [f"cannot read config file {path}: {reason}"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    path.chmod(0)
    with pytest.raises(ConfigError) as info:
        Config.load(path)
    assert info.value.errors == [f"cannot read config file {path}: Permission denied"]


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    path.write_bytes(b'hostname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        Config.load(path)
    assert info.value.errors == [f"config file {path}: not UTF-8 text"]


def test_config_error_from_a_single_string() -> None:
    exc = ConfigError("one problem")
    assert exc.errors == ["one problem"] and str(exc) == "one problem"


# -- with_overrides ---------------------------------------------------------------------------


def test_listen_override_replaces_all_listeners() -> None:
    config = Config.from_mapping({}, base_dir=BASE)
    new = config.with_overrides(
        listen=["127.0.0.1:0", "[::1]:2587/submission", "h.example:1/smtps"]
    )
    assert new.listen == (
        ListenConfig("127.0.0.1", 0, "smtp"),
        ListenConfig("::1", 2587, "submission"),
        ListenConfig("h.example", 1, "smtps"),
    )
    assert config.listen[0].port == 2525  # the original is untouched
    assert new.with_overrides(listen=[]).listen == ()


def test_override_errors_name_the_flag() -> None:
    config = Config.from_mapping({}, base_dir=BASE)
    with pytest.raises(ConfigError) as info:
        config.with_overrides(
            listen=["127.0.0.1:25/pop3", "nohost", "127.0.0.1:25", "127.0.0.1:25"],
            log_level="loud",
        )
    assert info.value.errors == [
        '--listen "127.0.0.1:25/pop3": mode must be one of smtp, submission, smtps, got "pop3"',
        '--listen "nohost": must be "host:port" or "[ipv6]:port"',
        "--listen: 127.0.0.1:25 is given more than once",
        '--log-level: must be one of debug, info, warning, error, got "loud"',
    ]


def test_state_dir_override_moves_derived_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = Config.from_mapping({}, base_dir=BASE).with_overrides(state_dir=Path("var"))
    state = tmp_path / "var"  # a command-line path is relative to the cwd
    assert config.state_dir == state
    assert config.local.maildir_root == state / "mail"
    assert config.auth.users_file == state / "passwd"
    assert config.queue_path == state / "queue.sqlite3"
    assert config.generated_cert_paths[0] == state / "tls" / "cert.pem"
    again = config.with_overrides(state_dir=tmp_path / "other")
    assert again.local.maildir_root == tmp_path / "other" / "mail"


def test_state_dir_override_keeps_explicit_paths(tmp_path: Path) -> None:
    config = Config.from_mapping(
        {"local": {"maildir_root": "/srv/mail"}, "auth": {"users_file": "users"}}, base_dir=BASE
    ).with_overrides(state_dir=tmp_path)
    assert config.state_dir == tmp_path
    assert config.local.maildir_root == Path("/srv/mail")
    assert config.auth.users_file == BASE / "users"


def test_log_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = Config.from_mapping({"log": {"format": "json"}}, base_dir=BASE)
    new = config.with_overrides(log_level="DEBUG", log_file=Path("mta.log"))
    assert (new.log.level, new.log.file, new.log.format) == ("debug", tmp_path / "mta.log", "json")
    assert config.log.level == "info"
    assert config.with_overrides() == config


# -- listen addresses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:25", ListenConfig("0.0.0.0", 25, "smtp")),
        ("[::]:25/smtps", ListenConfig("::", 25, "smtps")),
        ("localhost:0/submission", ListenConfig("localhost", 0, "submission")),
    ],
)
def test_listen_parse(text: str, expected: ListenConfig) -> None:
    assert ListenConfig.parse(text) == expected
    assert ListenConfig.parse(expected.address + "/" + expected.mode) == expected


@pytest.mark.parametrize(
    "text", ["", ":25", "[::1]", "[::1]25", "[x]:25", "a:b", "a:-1", "a:1:2", "a b:25", "a:25/"]
)
def test_listen_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        ListenConfig.parse(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[::1]", ("::1", 7)),
        ("::1", ("::1", 7)),
        ("host", ("host", 7)),
        ("host:8", ("host", 8)),
        ("[2001:db8::1]:9", ("2001:db8::1", 9)),
    ],
)
def test_parse_host_port_with_default(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, default_port=7) == expected


def test_format_host_port_brackets_ipv6_only() -> None:
    assert format_host_port("127.0.0.1", 25) == "127.0.0.1:25"
    assert format_host_port("mx.example.org", 587) == "mx.example.org:587"
    assert format_host_port("::1", 2525) == "[::1]:2525"
    assert ListenConfig("2001:db8::1", 0).address == "[2001:db8::1]:0"


_HOSTS = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
)


@given(_HOSTS, st.integers(min_value=0, max_value=65535))
def test_format_host_port_reads_back(host: str, port: int) -> None:
    assert parse_host_port(format_host_port(host, port)) == (host, port)


# -- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (2.5, 2.5),
        (0, 0.0),
        ("45", 45.0),
        ("1.5", 1.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("5d", 432000.0),
        ("1w", 604800.0),
        ("1h30m", 5400.0),
        ("1d 2h 3m 4s", 93784.0),
        ("1.5h", 5400.0),
        (" 10m ", 600.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "",
        "s",
        "5x",
        "5 m x",
        "30m1h",
        "1h1h",
        "5M",
        "-5",
        "-5s",
        "1.s",
        ".5s",
        "5s5",
        "nan",
        "inf",
        True,
        False,
        None,
        [],
        float("inf"),
        float("nan"),
        -1,
        -0.5,
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59, "59s"),
        (300, "5m"),
        (5400, "1h30m"),
        (432000, "5d"),
        (93784, "1d2h3m4s"),
        (-90, "-1m30s"),
        (29.6, "30s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_format_then_parse_is_identity(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


# -- cross-key checks (check-config) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "networks", "warns"),
    [
        ("0.0.0.0:25", ["0.0.0.0/0"], True),
        ("[::]:25", ["::/0"], True),
        ("192.0.2.1:25", ["10.0.0.0/8", "::/0"], True),
        ("mx.example.org:25", ["0.0.0.0/0"], True),  # a name may resolve to anything
        ("127.0.0.1:25", ["0.0.0.0/0"], False),
        ("[::1]:25", ["::/0"], False),
        ("localhost:25", ["0.0.0.0/0"], False),
        ("0.0.0.0:25", ["0.0.0.0/1", "128.0.0.0/1"], False),  # wide, but said on purpose
    ],
)
def test_open_relay_warning(listen: str, networks: list[str], warns: bool) -> None:
    config = Config.from_mapping(
        {"listen": [{"address": listen}], "relay": {"trusted_networks": networks}},
        base_dir=BASE,
    )
    warning = open_relay_warning(config)
    assert (warning is not None) == warns, warning
    if warning is not None:
        assert warning.startswith("[relay].trusted_networks: ") and listen in warning


def test_writable_file_problem(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    assert writable_file_problem(tmp_path / "file") is None
    assert writable_file_problem(tmp_path / "a" / "b" / "new.log") is None
    directory = tmp_path / "dir"
    assert writable_file_problem(directory) == f"{directory} is a directory, not a file"
    assert writable_file_problem(tmp_path / "file" / "x" / "y.log") == (
        f"cannot create {tmp_path / 'file' / 'x' / 'y.log'}: {tmp_path / 'file'} is not a directory"
    )
    assert not (tmp_path / "a").exists()  # checking creates nothing
