"""Pure helpers behind the local mail map: address keys, mailbox names, alias expansion.

Shared by :mod:`trio_mta.config` (which checks the maps once, at load, naming the key) and
:mod:`trio_mta.routing.router` (which applies them per RCPT), so both agree on every rule and
``config`` does not need to import the SMTP reply types that ``routing`` uses.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence

__all__ = [
    "MAX_ALIAS_DEPTH",
    "MAX_ALIAS_STEPS",
    "AliasExpansionError",
    "address_key",
    "expand_aliases",
    "local_mailbox",
    "safe_mailbox_name",
    "split_address",
    "unquote_local_part",
]

# Postfix's virtual_alias_recursion_limit and a work budget in the spirit of its
# virtual_alias_expansion_limit: expansion follows every simple path (see expand_aliases),
# so an adversarially shaped table could otherwise take exponential time.
MAX_ALIAS_DEPTH = 100
MAX_ALIAS_STEPS = 10_000

_MAX_NAME_OCTETS = 255  # NAME_MAX on every filesystem a Maildir lives on
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


class AliasExpansionError(ValueError):
    """An alias expands too deeply or into too much work to be a sane mail route."""


def safe_mailbox_name(name: str) -> str:
    """Return *name* unchanged if it can only ever name a folder directly inside the root.

    A mailbox name is never a path (SPEC §3): ``Path(root, name)`` must stay a direct child
    of ``root`` whatever the filesystem does with it, so the checks are a whitelist of
    shapes rather than a blacklist of attacks. Rejected, with :class:`ValueError`:
    empty, longer than 255 UTF-8 octets, ``.``/``..`` or any leading dot (hidden files and
    the traversal names), ``/`` or ``\\``, NUL and every control/format/unassigned/surrogate
    character (Unicode category C*), line and paragraph separators, and any ``%`` so that
    percent-encoded tricks (``%2e%2e``, ``%2f``) decoded by some later layer cannot exist.
    """
    if not name:
        raise ValueError("mailbox name is empty")
    for char in name:
        if char in "/\\":
            raise ValueError(f'mailbox name must not contain "{char}"')
        if char == "%":
            raise ValueError('mailbox name must not contain "%"')
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp"):
            raise ValueError(f"mailbox name must not contain control character U+{ord(char):04X}")
    if name.startswith("."):
        raise ValueError('mailbox name must not start with "."')
    if len(name.encode("utf-8")) > _MAX_NAME_OCTETS:
        raise ValueError(f"mailbox name is longer than {_MAX_NAME_OCTETS} octets")
    return name


def split_address(address: str) -> tuple[str, str]:
    """Split ``local@domain`` at the last ``@`` (a quoted local part may hold ``@``).

    Raises :class:`ValueError` when either side is empty.
    """
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError("must be an address local@domain")
    return local, domain


def unquote_local_part(local: str) -> str:
    """Undo RFC 5321 §4.1.2 quoting: ``"john doe"`` -> ``john doe``; a dot-string is kept."""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        return _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return local


def address_key(address: str) -> str:
    """The form under which maps and aliases are looked up: addresses match case-insensitively
    (SPEC §3), so the whole address is lower-cased."""
    return address.lower()


def local_mailbox(key: str, mailboxes: Mapping[str, str] | None) -> str | None:
    """The mailbox a local address key (see :func:`address_key`) delivers to, or None if unknown.

    With a map, only mapped addresses have one. Without a map every local part is its own
    mailbox, lower-cased (SPEC §3). ``postmaster`` always has one (RFC 5321 §4.5.1 requires
    accepting it for every local domain): its mapping if any, else the mailbox
    ``postmaster``. Raises :class:`ValueError` when the name the local part would give is
    unsafe (:func:`safe_mailbox_name`), so callers can answer "bad address" (5.1.3) rather
    than "unknown user" (5.1.1).
    """
    if mailboxes is not None and key in mailboxes:
        return safe_mailbox_name(mailboxes[key])  # config checked it; a hand-made one may not
    local = unquote_local_part(split_address(key)[0])
    if mailboxes is None or local == "postmaster":
        return safe_mailbox_name(local)
    return None


def expand_aliases(address: str, aliases: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Expand *address* through *aliases* (keys as :func:`address_key` gives them).

    Returns the final addresses, each once (first spelling wins), in the order a reader of
    the alias table would list them. An address that is not an alias key is final. An
    address met again while it is still being expanded (a loop, e.g. ``a -> [a, b]``) is not
    expanded again: it is returned as final, and the caller delivers it if it is a mailbox
    and drops it otherwise, as Postfix does with virtual aliases. So expansion always ends.

    Raises :class:`AliasExpansionError` past :data:`MAX_ALIAS_DEPTH` nesting levels or
    :data:`MAX_ALIAS_STEPS` visited addresses.
    """
    final: dict[str, str] = {}
    path: list[str] = []
    on_path: set[str] = set()
    steps = 0

    def visit(current: str) -> None:
        nonlocal steps
        steps += 1
        if steps > MAX_ALIAS_STEPS:
            raise AliasExpansionError(f"alias expansion takes more than {MAX_ALIAS_STEPS} steps")
        key = address_key(current)
        members = aliases.get(key)
        if members is None or key in on_path:
            final.setdefault(key, current)
            return
        if len(path) >= MAX_ALIAS_DEPTH:
            raise AliasExpansionError(f"aliases nest more than {MAX_ALIAS_DEPTH} levels deep")
        path.append(key)
        on_path.add(key)
        for member in members:
            visit(member)
        on_path.discard(path.pop())

    visit(address)
    return tuple(final.values())
