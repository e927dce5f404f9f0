"""Envelope paths (RFC 5321 §4.1.2), with RFC 6531 internationalised addresses.

Parsing is a single anchored regular expression per alphabet (ASCII or
UTF-8), so a MAIL/RCPT line costs a few microseconds and no Python loop runs
per character. Whatever survives the regex is checked for the §4.5.3.1 size
limits and, for address literals, by :mod:`ipaddress`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from trio_mta.smtp.errors import CommandError
from trio_mta.smtp.replies import Reply

MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 §4.5.3.1.2
MAX_PATH = 256  # RFC 5321 §4.5.3.1.3, including the angle brackets

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_UTF8 = "\u0080-\U0010ffff"


def _grammar(utf8: bool) -> tuple[str, str, str]:
    """(dot-string, quoted-string, domain) patterns; RFC 6531 §3.3 adds UTF8-non-ascii."""
    extra = _UTF8 if utf8 else ""
    atom = f"[{_ATEXT}{extra}]+"
    dot_string = f"{atom}(?:\\.{atom})*"
    # qtextSMTP (%d32-33 / %d35-91 / %d93-126) or quoted-pairSMTP ("\" %d32-126)
    quoted = f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{extra}]|\\\\[\\x20-\\x7e])*"'
    label = f"[A-Za-z0-9{extra}](?:[A-Za-z0-9{extra}\\-]*[A-Za-z0-9{extra}])?"
    domain = f"{label}(?:\\.{label})*"
    return dot_string, quoted, domain


def _path_re(utf8: bool) -> re.Pattern[str]:
    dot_string, quoted, domain = _grammar(utf8)
    literal = r"\[[\x21-\x5a\x5e-\x7e]*\]"  # dcontent: printable ASCII but "[\]"
    adl = f"@{domain}(?:,@{domain})*:"
    return re.compile(
        f"<(?:{adl})?(?:(?P<dot>{dot_string})|(?P<quoted>{quoted}))"
        f"@(?P<domain>{domain}|{literal})>"
        r"|<(?P<null>)>|<(?P<postmaster>[Pp][Oo][Ss][Tt][Mm][Aa][Ss][Tt][Ee][Rr])>"
    )


_PATH_ASCII = _path_re(False)
_PATH_UTF8 = _path_re(True)
_DOT_STRING_UTF8 = re.compile(_grammar(True)[0] + r"\Z")
_UNQUOTE_RE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Path:
    """A reverse- or forward-path: semantic local part and the domain as given.

    ``Path("", "")`` is the null path ``<>``; ``Path("postmaster", "")`` is
    the RFC 5321 §4.5.1 special ``<postmaster>``.
    """

    local_part: str
    domain: str

    @property
    def is_null(self) -> bool:
        return not self.local_part and not self.domain

    @property
    def address(self) -> str:
        return str(self)

    def __str__(self) -> str:
        if not self.domain:
            return self.local_part
        return f"{quote_local_part(self.local_part)}@{self.domain}"


NULL_PATH = Path("", "")


def quote_local_part(local_part: str) -> str:
    """The local part as a dot-string when it is one, else as a quoted-string."""
    if _DOT_STRING_UTF8.match(local_part):
        return local_part
    escaped = local_part.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def echo(text: str, limit: int = 80) -> str:
    """Peer-supplied text made safe to quote in a reply (no line breaks or controls)."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _bad(text: str) -> CommandError:
    return CommandError(Reply(501, "5.1.3", f"Bad address syntax: {echo(text)}"))


def match_path(
    text: str, pos: int = 0, *, smtputf8: bool, allow_null: bool, allow_postmaster: bool
) -> tuple[Path, int]:
    """Parse the path that starts at ``text[pos]``: (path, end); the caller checks the rest.

    Hot path of every MAIL and RCPT: one regex match, then length checks that
    take octet counts from ``len()`` when the text is ASCII (the usual case).
    """
    match = (_PATH_UTF8 if smtputf8 else _PATH_ASCII).match(text, pos)
    if match is None:
        if not smtputf8 and not text.isascii() and _PATH_UTF8.match(text, pos):
            # RFC 6531 §3.5: non-ASCII address without SMTPUTF8.
            raise CommandError(Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"))
        raise _bad(text[pos:])
    end = match.end()
    dot, quoted, domain, null, postmaster = match.group(
        "dot", "quoted", "domain", "null", "postmaster"
    )
    if domain is None:
        if null is not None and allow_null:
            return NULL_PATH, end
        if postmaster is not None and allow_postmaster:
            return Path(postmaster, ""), end
        raise _bad(text[pos:])
    ascii_only = text.isascii()
    if (end - pos if ascii_only else len(text[pos:end].encode())) > MAX_PATH:
        raise CommandError(Reply(501, "5.1.3", "Path too long"))
    if dot is not None:
        wire_local = local = dot
    else:
        wire_local = quoted
        local = _UNQUOTE_RE.sub(r"\1", quoted[1:-1]) if "\\" in quoted else quoted[1:-1]
        if not local:
            # The grammar allows "", but it cannot name a mailbox anywhere.
            raise _bad(text[pos:])
    if (len(wire_local) if ascii_only else len(wire_local.encode())) > MAX_LOCAL_PART:
        raise CommandError(Reply(501, "5.1.3", "Local part too long"))
    if domain[0] == "[":
        if not _valid_literal(domain[1:-1]):
            raise CommandError(Reply(501, "5.1.3", f"Bad address literal: {echo(domain)}"))
    elif (len(domain) > 63 or not ascii_only) and (
        len(domain.encode()) > MAX_DOMAIN
        or any(len(label.encode()) > 63 for label in domain.split("."))  # RFC 1035 §2.3.4
    ):
        raise CommandError(Reply(501, "5.1.3", "Domain name too long"))
    return Path(local, domain), end


def _valid_literal(inner: str) -> bool:
    """RFC 5321 §4.1.3: IPv4, or "IPv6:" + IPv6; general literals have no use for us."""
    if "%" in inner:  # ipaddress accepts IPv6 scope ids; the RFC grammar does not
        return False
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def parse_path(text: str, *, smtputf8: bool, allow_null: bool) -> Path:
    """Parse a complete ``<...>`` path; ``<postmaster>`` is allowed where ``<>`` is not.

    RFC 5321 §4.1.1.3: ``<Postmaster>`` is a forward-path (RCPT); ``<>`` a
    reverse-path (MAIL). Raises :class:`CommandError` (501 5.1.3 or 553 5.6.7).
    """
    path, end = match_path(
        text, smtputf8=smtputf8, allow_null=allow_null, allow_postmaster=not allow_null
    )
    if end != len(text):
        raise _bad(text)
    return path
