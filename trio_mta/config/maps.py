"""[local] mail maps for :mod:`trio_mta.config`: mailboxes file, inline map and aliases.

Checked once at load, each problem naming its key or file line, so that routing can apply
the maps per RCPT without ever meeting an address it cannot place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trio_mta.config import schema
from trio_mta.config.schema import Table, show
from trio_mta.routing.mailmap import (
    AliasExpansionError,
    address_key,
    expand_aliases,
    local_mailbox,
    safe_mailbox_name,
    split_address,
)

__all__ = ["MailMaps"]


class MailMaps:
    """Collects [local].mailboxes_file, [local.mailboxes] and [local.aliases], then checks
    that every alias leads somewhere deliverable, once, at load time rather than per RCPT."""

    def __init__(self, domains: tuple[str, ...], errors: list[str]) -> None:
        self.domains = domains
        self.errors = errors
        self.mailboxes: dict[str, str] | None = None
        self.origin: dict[str, str] = {}  # address key -> where it was defined, for messages
        self.aliases: dict[str, tuple[str, ...]] = {}
        self.alias_names: dict[str, str] = {}  # address key -> its table key, for messages

    def local_key(self, address: Any) -> str:
        """A map or alias key: a syntactically sane address in a local domain, lower-cased."""
        if not isinstance(address, str):
            raise ValueError("must be an address local@domain")
        _check_address(address)
        domain = split_address(address)[1].lower()
        if domain not in self.domains:
            raise ValueError(f"domain {domain} is not in [local].domains")
        return address_key(address)

    def add_mailbox(self, label: str, address: str, mailbox: Any) -> None:
        try:
            key = self.local_key(address)
        except ValueError as exc:
            self.errors.append(f"{label}: {exc}")
            return
        if not isinstance(mailbox, str):
            self.errors.append(f"{label}: the mailbox name must be a string, got {show(mailbox)}")
            return
        try:
            safe_mailbox_name(mailbox)
        except ValueError as exc:
            self.errors.append(f"{label}: {exc}, got {show(mailbox)}")
            return
        if self.mailboxes is None:
            self.mailboxes = {}
        if key in self.mailboxes and self.mailboxes[key] != mailbox:
            self.errors.append(
                f"{label}: {key} is already mapped to {show(self.mailboxes[key])} "
                f"({self.origin[key]})"
            )
            return
        self.mailboxes[key] = mailbox
        self.origin[key] = label

    def read_file(self, path: Path) -> None:
        """Lines ``address  mailbox-name``; ``#`` starts a comment; blank lines are fine."""
        label = "[local].mailboxes_file"
        if self.mailboxes is None:
            self.mailboxes = {}
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            self.errors.append(f"{label}: cannot read {path}: {exc.strerror or exc}")
            return
        except UnicodeDecodeError:
            self.errors.append(f"{label}: {path} is not UTF-8 text")
            return
        for number, line in enumerate(text.split("\n"), 1):
            fields = line.split()
            comment = next((i for i, f in enumerate(fields) if f.startswith("#")), len(fields))
            fields = fields[:comment]
            where = f"{label}: {path} line {number}"
            if not fields:
                continue
            if len(fields) != 2:
                self.errors.append(f'{where}: expected "address mailbox-name", got {show(line)}')
                continue
            self.add_mailbox(where, fields[0], fields[1])

    def read_inline(self, table: Table) -> None:
        for address, mailbox in table.data.items():
            self.add_mailbox(table.name(address), address, mailbox)

    def read_aliases(self, table: Table) -> None:
        for address, members in table.data.items():
            label = table.name(address)
            try:
                key = self.local_key(address)
            except ValueError as exc:
                self.errors.append(f"{label}: {exc}")
                continue
            if isinstance(members, str):
                members = [members]
            if not isinstance(members, list) or not members:
                self.errors.append(
                    f"{label}: must be a non-empty array of addresses, got {show(members)}"
                )
                continue
            targets = []
            for index, member in enumerate(members, 1):
                try:
                    targets.append(_alias_member(member))
                except ValueError as exc:
                    self.errors.append(f"{label}[{index}]: {exc}, got {show(member)}")
            if key in self.aliases:
                self.errors.append(f"{label}: {key} is already an alias ({self.alias_names[key]})")
                continue
            self.aliases[key] = tuple(targets)
            self.alias_names[key] = label

    def check_aliases(self) -> None:
        """Every local member must be a mailbox or an alias, and every alias must end in at
        least one target: a loop of aliases that are not mailboxes would silently eat mail."""
        for key, members in self.aliases.items():
            label = self.alias_names[key]
            problems = [(m, p) for m in members if (p := self.undeliverable(m)) is not None]
            for member, problem in problems:
                self.errors.append(f"{label}: {show(member)} {problem}")
            if problems:
                continue
            try:
                finals = expand_aliases(key, self.aliases)
            except AliasExpansionError as exc:
                self.errors.append(f"{label}: {exc}")
                continue
            if not any(self.delivers(final) for final in finals):
                self.errors.append(f"{label}: expands to no mailbox or remote address")

    def delivers(self, final: str) -> bool:
        """Whether a final address (after expansion) gets a copy: remote, or a mailbox."""
        if split_address(final)[1].lower() not in self.domains:
            return True
        try:
            return local_mailbox(address_key(final), self.mailboxes) is not None
        except ValueError:
            return False

    def undeliverable(self, address: str) -> str | None:
        """Why *address* cannot receive mail here, or None if it can (or is remote)."""
        if split_address(address)[1].lower() not in self.domains:
            return None
        key = address_key(address)
        try:
            mailbox = local_mailbox(key, self.mailboxes)
        except ValueError as exc:
            return f"is not a safe mailbox: {exc}"
        if mailbox is None and key not in self.aliases:
            return "is neither a mailbox nor an alias"
        return None


def _check_address(address: str) -> None:
    """Syntax good enough for a map entry: ``local@domain``, no spaces, controls or brackets."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 or c in "<>" for c in address):
        raise ValueError("must be an address local@domain")
    if not schema.is_hostname(split_address(address)[1]):
        raise ValueError("must be an address local@domain")


def _alias_member(member: Any) -> str:
    """An alias target, local or remote; the domain lower-cased (RFC 5321 §2.4), the local
    part kept as written (remote systems may treat it case-sensitively)."""
    if not isinstance(member, str):
        raise ValueError("must be an address local@domain")
    _check_address(member)
    local, domain = split_address(member)
    return f"{local}@{domain.lower()}"
