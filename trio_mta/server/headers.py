"""Trace and submission headers added at acceptance.

``Received:`` follows RFC 5321 §4.4 (From/By/With/ID/For clauses, then the
date) with the TLS and authentication facts in comments, as Postfix writes
them. ``Message-ID:`` and ``Date:`` are only added for clients we vouch for
(authenticated or trusted), per RFC 6409 §8.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
import time
from dataclasses import dataclass

_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


@dataclass(frozen=True)
class TraceInfo:
    """What the ``Received:`` header says about the session and message."""

    helo: str | None
    client_ip: str
    hostname: str
    queue_id: str
    esmtp: bool
    tls: str | None  # "TLSv1.3 TLS_AES_256_GCM_SHA384"
    auth_user: str | None
    recipients: tuple[str, ...]
    smtputf8: bool = False  # the transaction's MAIL carried SMTPUTF8


def address_literal(ip: str) -> str:
    """RFC 5321 §4.1.3 address literal: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return f"[{ip}]"
    if parsed.version == 6:
        mapped = parsed.ipv4_mapped
        return f"[{mapped}]" if mapped else f"[IPv6:{parsed.compressed}]"
    return f"[{parsed}]"


def _protocol(info: TraceInfo) -> str:
    """The ``with`` clause: RFC 3848 ESMTP[S][A], or for a transaction that used
    SMTPUTF8 the UTF8SMTP[S][A] types RFC 6531 §3.7.3 registers instead."""
    if not info.esmtp:
        return "SMTP"
    base = "UTF8SMTP" if info.smtputf8 else "ESMTP"
    return base + ("S" if info.tls else "") + ("A" if info.auth_user else "")


def _clean(text: str) -> str:
    """Keep header text to printable characters; a HELO name is client-controlled."""
    return "".join(c if c.isprintable() and c not in "()\\" else "?" for c in text)[:255]


_date_cache: tuple[int, str] = (-1, "")


def rfc5322_date(now: float | None = None) -> str:
    """The local-time date of RFC 5322 §3.3, formatted once per second (it is per message)."""
    global _date_cache
    second = int(time.time() if now is None else now)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, localtime=True))
    return _date_cache[1]


def received_header(info: TraceInfo, now: float | None = None) -> bytes:
    helo = _clean(info.helo) if info.helo else "unknown"
    lines = [f"Received: from {helo} ({address_literal(info.client_ip)})"]
    if info.tls:
        version, _, cipher = info.tls.partition(" ")
        lines.append(f"\t(using {version} with cipher {_clean(cipher)})")
    if info.auth_user:
        lines.append(f"\t(Authenticated sender: {_clean(info.auth_user)})")
    lines.append(f"\tby {info.hostname} (trio_mta) with {_protocol(info)} id {info.queue_id}")
    date = rfc5322_date(now)
    # Name the recipient only when there is exactly one, so a Received line
    # never discloses the other (e.g. Bcc) recipients of the same copy.
    if len(info.recipients) == 1:
        lines.append(f"\tfor <{_clean(info.recipients[0])}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def header_names(message: bytes) -> set[str]:
    """Lower-cased names of the header fields in the header section of ``message``."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    if message.startswith(b"\r\n"):
        return set()
    return {m.group(1).decode("ascii").lower() for m in _HEADER_NAME.finditer(head)}


def submission_headers(
    message: bytes, *, queue_id: str, hostname: str, now: float | None = None
) -> bytes:
    """``Message-ID:``/``Date:`` lines the message lacks (RFC 6409 §8.2, §8.3)."""
    present = header_names(message)
    extra = b""
    if "date" not in present:
        extra += f"Date: {rfc5322_date(now)}\r\n".encode("ascii")
    if "message-id" not in present:
        extra += f"Message-ID: <{queue_id}@{hostname}>\r\n".encode("utf-8", "replace")
    return extra
