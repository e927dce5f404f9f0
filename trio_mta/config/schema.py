"""The checking half of :mod:`trio_mta.config`: value converters and a table reader.

Every converter takes a raw TOML value and returns the typed value or raises
:class:`ValueError` with a message that completes ``"<key>: "``. :class:`Table` wraps one
TOML table: each ``get`` names its key, records a failure instead of raising (so the user
sees every problem at once, SPEC §2 ``check-config``), and whatever was never asked for
is an unknown key.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from trio_mta.config.durations import parse_duration

T = TypeVar("T")
S = TypeVar("S", bound=str)

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def show(value: object) -> str:
    """Render a TOML value the way the user wrote it, for ``got ...`` in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return str(value)


def quote_key(key: str) -> str:
    """A table key as TOML would need it: ``"alice@example.org"`` stays quoted."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


# -- converters -----------------------------------------------------------------------------


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("must be a positive integer")
    return value


def port(value: Any) -> int:
    """A TCP port to listen on; 0 asks the kernel for a free one (tests)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError("must be a port number 0..65535")
    return value


def remote_port(value: Any) -> int:
    """A TCP port to connect to: 0 is meaningless there."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError("must be a port number 1..65535")
    return value


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be a duration greater than zero")
    return seconds


def choice(options: tuple[S, ...]) -> Callable[[Any], S]:
    """One of a fixed set of strings, compared exactly (TOML values are case-sensitive)."""

    def convert(value: Any) -> S:
        for option in options:
            if value == option:
                return option
        raise ValueError(f"must be one of {', '.join(options)}")

    return convert


def is_hostname(text: str) -> bool:
    """RFC 1123 §2.1 host name: dot-separated LDH labels, 253 octets at most."""
    return 0 < len(text) <= 253 and all(_LABEL.match(label) for label in text.split("."))


def hostname(value: Any) -> str:
    if not isinstance(value, str) or not is_hostname(value):
        raise ValueError("must be a host name like mx.example.org")
    return value


def domain(value: Any) -> str:
    """A mail domain, lower-cased: domains compare case-insensitively (RFC 5321 §2.4)."""
    if not isinstance(value, str) or not is_hostname(value):
        raise ValueError("must be a domain name like example.org")
    return value.lower()


def path_under(base: Path) -> Callable[[Any], Path]:
    """A file or folder; relative paths resolve against *base* (the config file's folder)."""

    def convert(value: Any) -> Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise ValueError("must be a non-empty path")
        return base / value

    return convert


def optional_path_under(base: Path) -> Callable[[Any], Path | None]:
    """Like :func:`path_under`, but ``""`` means "not set" (as SPEC §3 writes ``ca_file = ""``)."""
    required = path_under(base)

    def convert(value: Any) -> Path | None:
        return None if value == "" else required(value)

    return convert


def system_user(value: Any) -> str:
    """An account in the system's user database (``user = "trio-mta"``), never root."""
    import pwd

    if not isinstance(value, str) or not value:
        raise ValueError("must be a user name like trio-mta")
    try:
        entry = pwd.getpwnam(value)
    except KeyError:
        raise ValueError("no such user (create it, e.g. useradd --system trio-mta)") from None
    if entry.pw_uid == 0:
        raise ValueError("must not be root: it is the account the server drops root for")
    return value


def system_group(value: Any) -> str:
    """A group in the system's group database (``group = "trio-mta"``)."""
    import grp

    if not isinstance(value, str) or not value:
        raise ValueError("must be a group name like trio-mta")
    try:
        grp.getgrnam(value)
    except KeyError:
        raise ValueError("no such group") from None
    return value


def ip_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
    raise ValueError('must be an IP network like "10.0.0.0/8" or "::1/128"')


def parse_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``"host:port"`` / ``"[v6]:port"`` (or ``host``/``[v6]``/bare v6 given a default port).

    The host is an IP address (IPv6 returned without brackets) or a host name. A bare IPv6
    address with a port is ambiguous, so brackets are required for that. Raises
    :class:`ValueError`.
    """
    if default_port is None:
        hint = 'must be "host:port" or "[ipv6]:port"'
    else:
        hint = 'must be "host", "host:port" or "[ipv6]:port"'
    port_text: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")) or ":" not in host:
            raise ValueError(hint)
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        if default_port is None:
            raise ValueError(hint + ' (write IPv6 addresses as "[::1]:25")')
        host = text
    elif ":" in text:
        host, port_text = text.split(":")
    else:
        host = text
    if port_text is None:
        if default_port is None:
            raise ValueError(hint)
        number = default_port
    elif port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535:
        number = int(port_text)
    else:
        raise ValueError(hint + " with a port 0..65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if ":" in host or not is_hostname(host):
            raise ValueError(hint) from None
    return host, number


def lmtp_target(value: Any) -> str:
    """``"host:port"`` or ``"unix:/absolute/path"`` of an LMTP server, normalised."""
    hint = 'must be "host:port", "[ipv6]:port" or "unix:/path/to/socket"'
    if not isinstance(value, str):
        raise ValueError(hint)
    if value.startswith("unix:"):
        if not value[len("unix:") :].startswith("/"):
            raise ValueError(hint + " (an absolute path)")
        return value
    try:
        host, number = parse_host_port(value)
    except ValueError:
        raise ValueError(hint) from None
    if number == 0:
        raise ValueError(hint + " with a port 1..65535")
    return format_host_port(host, number)


def group_id(value: Any) -> int:
    """A group name known to this system, or a numeric gid."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value:
        if value.isascii() and value.isdigit():
            return int(value)
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ValueError(f"no group named {value!r} on this system") from None
    raise ValueError("must be a group name or a numeric group id")


def format_host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (``[::1]:25``): what :func:`parse_host_port`
    reads back, and how every message and log line shows an address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_port(value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ValueError('must be "host:port" or "[ipv6]:port"')
    return parse_host_port(value)


def milter_address(value: Any) -> str:
    """``host:port`` or ``unix:/absolute/path`` (a ``[[milter]]`` address)."""
    if isinstance(value, str) and value.startswith("unix:"):
        if not value[5:].startswith("/"):
            raise ValueError('must be "unix:/absolute/path"')
        return value
    host, number = host_port(value) if isinstance(value, str) else host_port(None)
    if number == 0:
        raise ValueError("needs a port 1..65535")
    return format_host_port(host, number)


def nameserver(value: Any) -> tuple[str, int]:
    """A DNS server: an IP address with an optional port, default 53."""
    hint = 'must be an IP address with optional port: "127.0.0.1:5353", "::1", "[::1]:53"'
    if not isinstance(value, str):
        raise ValueError(hint)
    try:
        host, number = parse_host_port(value, default_port=53)
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(hint) from None
    if number == 0:
        raise ValueError(hint)
    return host, number


# -- tables ---------------------------------------------------------------------------------


class Table:
    """One TOML table being read; records errors into a shared list instead of raising."""

    def __init__(self, label: str, data: Any, errors: list[str]) -> None:
        self.label = label
        self.errors = errors
        self.used: set[str] = set()
        if data is None:
            data = {}
        elif not isinstance(data, Mapping):
            self.errors.append(f"{label or 'the configuration'}: must be a table, got {show(data)}")
            data = {}
        self.data: Mapping[str, Any] = data

    def name(self, key: str) -> str:
        """Full name of *key* for messages: ``[limits].max_recipients``, ``hostname``."""
        return f"{self.label}.{quote_key(key)}" if self.label else quote_key(key)

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.name(key)}: {message}")

    def raw(self, key: str) -> Any:
        """The unconverted value (None when absent), marking the key as known."""
        self.used.add(key)
        return self.data.get(key)

    def get(self, key: str, convert: Callable[[Any], T], default: T, *, secret: bool = False) -> T:
        """Converted value of *key*, or *default* when absent or invalid (the error recorded).

        *secret* keeps the offending value out of the message (passwords).
        """
        value = self.raw(key)
        if value is None:
            return default
        try:
            return convert(value)
        except ValueError as exc:
            self.error(key, str(exc) if secret else f"{exc}, got {show(value)}")
            return default

    def get_list(self, key: str, convert: Callable[[Any], T], default: list[T]) -> list[T]:
        """An array whose items are checked one by one, each bad item named ``key[n]`` (1-based)."""
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, list):
            self.error(key, f"must be an array, got {show(value)}")
            return default
        out: list[T] = []
        for index, item in enumerate(value, 1):
            try:
                out.append(convert(item))
            except ValueError as exc:
                self.errors.append(f"{self.name(key)}[{index}]: {exc}, got {show(item)}")
        return out

    def table(self, key: str, label: str) -> Table:
        """A nested table (``[local.mailboxes]``), labelled as the user wrote its header."""
        return Table(label, self.raw(key), self.errors)

    def close(self, *, known: Iterable[str] = ()) -> None:
        """Report every key nobody asked for, with a spelling hint when one is close."""
        expected = self.used | set(known)
        for key in self.data:
            if key in expected:
                continue
            hint = difflib.get_close_matches(key, sorted(expected), n=1)
            suffix = f" (did you mean {hint[0]}?)" if hint else ""
            self.errors.append(f"unknown key {self.name(key)}{suffix}")
