"""Where a recipient goes and whether this client may send there (SPEC §3, §5).

Pure decisions over the maps :mod:`trio_mta.config` already read and checked: no I/O, so
the SMTP session can call it inline for every RCPT.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from trio_mta.config import LocalConfig, RelayConfig
from trio_mta.routing.mailmap import (
    AliasExpansionError,
    address_key,
    expand_aliases,
    local_mailbox,
    safe_mailbox_name,
    split_address,
)
from trio_mta.smtp.replies import Reply

__all__ = [
    "LocalTarget",
    "RcptVerdict",
    "RemoteTarget",
    "Router",
    "Target",
    "control_character",
    "safe_mailbox_name",
    "unsafe_recipient",
    "unsafe_sender",
]


@dataclass(frozen=True)
class LocalTarget:
    """Deliver into the Maildir ``<maildir_root>/<mailbox>``; *address* goes in Delivered-To."""

    address: str  # final address, lower-cased
    mailbox: str  # passed safe_mailbox_name


@dataclass(frozen=True)
class RemoteTarget:
    """Deliver over SMTP to *domain*'s MX (or the smarthost)."""

    address: str  # local part as written, domain lower-cased
    domain: str


Target = LocalTarget | RemoteTarget


@dataclass(frozen=True)
class RcptVerdict:
    accepted: bool
    reply: Reply
    targets: tuple[Target, ...] = ()  # final, de-duplicated; empty when refused


_ACCEPTED = Reply(250, "2.1.5", ("Ok",))

# C0 and C1 controls, DEL and the Unicode line/paragraph separators. The SMTP
# grammar keeps C0 out of a command line, but RFC 6531 admits any non-ASCII
# character, quoted or not, and an address goes verbatim into Return-Path:,
# Delivered-To: and logs, where NEL or U+2028 would start a new line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def control_character(text: str) -> str | None:
    """The first control or line-separator character of ``text`` as ``U+NNNN``, or None."""
    found = _CONTROL.search(text)
    return None if found is None else f"U+{ord(found.group()):04X}"


def unsafe_sender(address: str) -> Reply | None:
    """The refusal of a MAIL FROM address holding a control character, or None."""
    char = control_character(address)
    if char is None:
        return None
    return Reply(501, "5.1.7", (f"Bad sender address syntax: {char} not allowed in an address",))


def unsafe_recipient(address: str) -> Reply | None:
    """The refusal of a RCPT TO address holding a control character, or None."""
    char = control_character(address)
    if char is None:
        return None
    return Reply(553, "5.1.3", (f"Bad recipient address syntax: {char} not allowed in an address",))


class Router:
    """Answers RCPT: local or remote, known or unknown, relay allowed or not."""

    def __init__(self, local: LocalConfig, relay: RelayConfig) -> None:
        self._domains = tuple(domain.lower() for domain in local.domains)
        self._domain_set = frozenset(self._domains)
        self._mailboxes = (
            None
            if local.mailboxes is None
            else {address_key(k): v for k, v in local.mailboxes.items()}
        )
        self._aliases = {address_key(k): tuple(v) for k, v in local.aliases.items()}
        self._networks = relay.trusted_networks
        self._trusted: dict[str, bool] = {}  # is_trusted answers by address string

    @property
    def domains(self) -> tuple[str, ...]:
        """The local domains, lower-cased, in configuration order."""
        return self._domains

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self._domain_set

    def is_trusted(self, ip: str) -> bool:
        """Whether *ip* is in ``[relay].trusted_networks``; not an IP address: False.

        An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``, what a dual-stack socket reports
        for an IPv4 peer) is judged as the IPv4 address it carries. Answers are remembered
        for the last few thousand addresses: the check runs at every RCPT and parsing the
        address showed in the per-message profile.
        """
        known = self._trusted.get(ip)
        if known is not None:
            return known
        if len(self._trusted) >= 4096:
            self._trusted.clear()
        self._trusted[ip] = verdict = self._judge(ip)
        return verdict

    def _judge(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def check_recipient(
        self,
        address: str,
        *,
        client_ip: str,
        authenticated: bool,
        relay_allowed_for_mode: bool = True,
    ) -> RcptVerdict:
        """Decide one RCPT TO. *address* is the path without brackets (``str(Path)``).

        A local recipient is accepted from anyone when it is deliverable; what it expands to
        is not subject to relay rules (the local domain took responsibility). A remote one
        needs ``relay_allowed_for_mode`` and either a trusted client or AUTH (SPEC §3 table).
        """
        refusal = unsafe_recipient(address)
        if refusal is not None:
            return RcptVerdict(False, refusal, ())
        shown = _printable(address)
        normalized = self._normalize(address)
        try:
            _, domain = split_address(normalized)
        except ValueError:
            return _refuse(550, "5.1.3", f"<{shown}>: Bad recipient address syntax")
        if not self.is_local_domain(domain):
            if relay_allowed_for_mode and (authenticated or self.is_trusted(client_ip)):
                domain = domain.lower()
                target = RemoteTarget(f"{normalized.rpartition('@')[0]}@{domain}", domain)
                return RcptVerdict(True, _ACCEPTED, (target,))
            return _refuse(554, "5.7.1", f"<{shown}>: Relay access denied")
        key = address_key(normalized)
        if key not in self._aliases:
            try:
                mailbox = local_mailbox(key, self._mailboxes)
            except ValueError:
                # RFC 3463 X.1.3: the address cannot be a mailbox name here.
                return _refuse(550, "5.1.3", f"<{shown}>: Recipient address rejected: bad mailbox")
            if mailbox is None:
                return _refuse(550, "5.1.1", f"<{shown}>: Recipient address rejected: User unknown")
        try:
            targets = self._expand(normalized)
        except AliasExpansionError:
            targets = ()
        if not targets:
            # RFC 3463 X.4.6: routing loop (config load refuses such tables; hand-made ones
            # may still hold one).
            return _refuse(550, "5.4.6", f"<{shown}>: Recipient address rejected: alias loop")
        return RcptVerdict(True, _ACCEPTED, targets)

    def expand(self, address: str) -> tuple[Target, ...]:
        """Final delivery targets for *address*, aliases expanded (recursive, loop-safe,
        each target once). Unknown local addresses yield nothing; so does an alias table
        too large to expand (see :func:`trio_mta.routing.mailmap.expand_aliases`)."""
        try:
            return self._expand(self._normalize(address))
        except AliasExpansionError:
            return ()

    def _normalize(self, address: str) -> str:
        """``<postmaster>`` without a domain (RFC 5321 §4.5.1) means the first local domain's."""
        if address.lower() == "postmaster" and self._domains:
            return f"postmaster@{self._domains[0]}"
        return address

    def _expand(self, address: str) -> tuple[Target, ...]:
        targets: dict[str, Target] = {}
        for final in expand_aliases(address, self._aliases):
            target = self._target(final)
            if target is None:
                continue
            # One copy per mailbox even when several addresses land in it (SPEC §5).
            dedup = "local:" + target.mailbox if isinstance(target, LocalTarget) else target.address
            targets.setdefault(dedup, target)
        return tuple(targets.values())

    def _target(self, final: str) -> Target | None:
        try:
            local, domain = split_address(final)
        except ValueError:
            return None
        domain = domain.lower()
        if domain not in self._domain_set:
            return RemoteTarget(f"{local}@{domain}", domain)
        key = address_key(final)
        try:
            mailbox = local_mailbox(key, self._mailboxes)
        except ValueError:
            return None
        return None if mailbox is None else LocalTarget(key, mailbox)


def _refuse(code: int, status: str, text: str) -> RcptVerdict:
    return RcptVerdict(False, Reply(code, status, (text,)), ())


def _printable(address: str) -> str:
    """The address for reply text: control characters (a CR/LF could forge a reply line)
    shown as ``?``. The parser should never let them through; this is the second lock."""
    return "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in address)
