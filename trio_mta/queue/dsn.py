"""Delivery status notifications (bounces), built as bytes.

The result is a complete RFC 5322 message: a ``multipart/report`` (RFC 6522)
whose parts are a human explanation in Postfix's wording, a
``message/delivery-status`` (RFC 3464) and the returned original, either its
header section (``text/rfc822-headers``) or the whole message
(``message/rfc822``). The message is assembled by hand rather than through
``email.generator`` so that the original's bytes — including 8-bit headers —
go back to the sender exactly as received, and every line ends in CRLF and
stays within 998 octets (RFC 5322 §2.1.1).

The caller sends the result with the null reverse-path ``<>`` so that a
bounce can never cause another bounce (RFC 5321 §3.6.3, §6.1).
"""

from __future__ import annotations

import email.utils
import re
import secrets
import textwrap
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

MAX_LINE = 998  # octets, CRLF excluded (RFC 5322 §2.1.1)
_FOLD_AT = 78  # preferred header line length (RFC 5322 §2.1.1)
_TEXT_WIDTH = 76

# RFC 3464 §2.3.3; "delivered" and "relayed" are the success notices RFC 3461
# NOTIFY=SUCCESS asks for ("expanded" is not sent: aliases report "delivered").
_ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed"})
_SUCCESS = frozenset({"delivered", "relayed"})
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")  # RFC 3464 §2.3.4 / RFC 3463 §2
MAX_HEADERS = 64 * 1024  # octets of a returned header section (text/rfc822-headers)
_HEADER_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")  # RFC 5322 §3.6.8 field name
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
_WHITESPACE = re.compile(r"\s+")

# RFC 3463 §3 subject sub-codes, used when there is no remote reply to quote.
_SUBJECTS = {
    "0": "other or undefined status",
    "1": "addressing status",
    "2": "mailbox status",
    "3": "mail system status",
    "4": "network and routing status",
    "5": "mail delivery protocol status",
    "6": "message content or media status",
    "7": "security or policy status",
}
_DETAILS = {
    "1.1": "bad destination mailbox address",
    "1.2": "bad destination system address",
    "1.10": "recipient domain does not accept mail (null MX)",  # RFC 7505 (null MX)
    "2.2": "mailbox full",
    "3.4": "message too big for system",
    "4.1": "no answer from host",
    "4.3": "directory server failure",
    "4.4": "unable to route",
    "4.7": "delivery time expired",
    "7.1": "delivery not authorized, message refused",
}


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient's outcome, as reported in its RFC 3464 §2.3 field block."""

    address: str  # Final-Recipient
    original: str | None  # the RCPT TO as given, when different (Original-Recipient)
    status: str  # RFC 3463 code, e.g. "5.1.1"
    diagnostic: str | None  # remote reply text, e.g. "550 5.1.1 <b@x>: user unknown"
    remote_mta: str | None  # host name of the MTA that gave the diagnostic
    last_attempt: float | None  # seconds since the epoch
    action: str = "failed"
    # True: ``diagnostic`` is a server's SMTP reply ("smtp;", RFC 3464 §2.3.6);
    # False: our own finding (DNS, TLS, expiry), typed "X-trio-mta;" as Postfix's X-Postfix.
    smtp_reply: bool = False
    orcpt: str | None = None  # RFC 3461 ORCPT: reported as Original-Recipient

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"action must be one of {sorted(_ACTIONS)}, got {self.action!r}")
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"status must be an RFC 3463 code like 5.1.1, got {self.status!r}")


def needs_bounce(sender: str) -> bool:
    """False only for the null reverse-path: never bounce a bounce (RFC 5321 §6.1)."""
    return sender != ""


def build_bounce(
    *,
    reporting_mta: str,
    sender: str,
    queue_id: str,
    arrival: float,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    now: float | None = None,
    return_full_message: bool = False,
    max_original: int = 256 * 1024,
    max_headers: int = MAX_HEADERS,
    envid: str | None = None,
) -> bytes:
    """The DSN telling ``sender`` that ``recipients`` of message ``queue_id`` failed.

    ``original`` is the message as queued. Only its header section is returned
    unless ``return_full_message``; then at most ``max_original`` octets of it,
    cut at a line end, so a bounce of a huge message stays small. A returned
    header section is cut to ``max_headers`` octets, between two fields; the
    explanation says when either was cut. ``envid`` (RFC 3461 ENVID) is
    reported as Original-Envelope-Id.
    """
    if not needs_bounce(sender):
        raise ValueError("no delivery status notification for the null sender (RFC 5321 §6.1)")
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    when = time.time() if now is None else now
    host = _host(reporting_mta)
    limit = max_original if return_full_message else max_headers
    attached, truncated = _returned(original, return_full_message, limit)
    parts = [
        _text_part(host, recipients, return_full_message, truncated, limit),
        _status_part(host, queue_id, arrival, recipients, envid),
        attached,
    ]
    boundary = _boundary(parts)
    if all(r.action == "delayed" for r in recipients):
        subject = "Delayed Mail (still being retried)"
    elif all(r.action in _SUCCESS for r in recipients):
        subject = "Successful Mail Delivery Report"
    else:
        subject = "Undelivered Mail Returned to Sender"
    fields = [
        ("From", f"MAILER-DAEMON@{host} (Mail Delivery System)"),
        ("To", _text(sender)),
        ("Subject", subject),
        ("Date", email.utils.formatdate(when, localtime=True)),
        ("Message-ID", f"<bounce-{_token(queue_id)}.{secrets.token_hex(6)}@{host}>"),
        # RFC 3834 §5: a machine-generated response; well-behaved
        # auto-responders will not answer it.
        ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/report; report-type=delivery-status; boundary="{boundary}"'),
    ]
    if any(_EIGHT_BIT.search(part) for part in parts):
        # RFC 2045 §6.4: a multipart's encoding must cover its parts'.
        fields.append(("Content-Transfer-Encoding", "8bit"))
    out = [_header_lines(fields), b"\r\n", b"This is a MIME-encapsulated message.\r\n"]
    for part in parts:
        out += [b"\r\n--", boundary.encode("ascii"), b"\r\n", part]
    out += [b"\r\n--", boundary.encode("ascii"), b"--\r\n"]
    return b"".join(out)


# --- the three parts -------------------------------------------------------


def _text_part(
    host: str, recipients: Sequence[FailedRecipient], full: bool, truncated: bool, max_original: int
) -> bytes:
    """Part 1: what happened, for a person (RFC 6522 §3 requires it first)."""
    returned = "It's attached below." if full else "Its headers are attached below."
    if all(r.action in _SUCCESS for r in recipients):
        news = (
            "Your message was successfully delivered to the destination(s) listed "
            "below. If the message was delivered to a mailbox you will receive no "
            "further notifications. Otherwise you may still receive notifications "
            "of mail delivery errors from other systems. " + returned
        )
    elif all(r.action == "delayed" for r in recipients):
        news = (
            "This is a warning only; you do not need to resend your message. "
            "It could not be delivered yet to one or more recipients, and the "
            "mail system will keep trying. " + returned
        )
    else:
        news = (
            "I'm sorry to have to inform you that your message could not be "
            "delivered to one or more recipients. " + returned
        )
    paragraphs = [
        f"This is the mail system at host {host}.",
        news,
        "For further assistance, please send mail to postmaster.",
        "If you do so, please include this problem report. You can delete your "
        "own text from the attached returned message.",
    ]
    if truncated and full:
        paragraphs.append(f"The returned message was cut to its first {max_original} octets.")
    elif truncated:
        paragraphs.append(
            f"The returned headers were cut to their first {max_original} "
            "octets, after a complete header field."
        )
    lines: list[str] = []
    for paragraph in paragraphs:
        lines += [*textwrap.wrap(paragraph, _TEXT_WIDTH), ""]
    lines += ["                   The mail system", ""]
    for rcpt in recipients:
        lines += textwrap.wrap(
            _reason(rcpt),
            _TEXT_WIDTH,
            subsequent_indent="    ",
            break_long_words=True,
            break_on_hyphens=False,
        )
        lines.append("")
    body = "\r\n".join(lines).encode("utf-8")
    eight_bit = _EIGHT_BIT.search(body) is not None
    head = _header_lines(
        [
            ("Content-Description", "Notification"),
            ("Content-Type", f"text/plain; charset={'utf-8' if eight_bit else 'us-ascii'}"),
            ("Content-Transfer-Encoding", "8bit" if eight_bit else "7bit"),
        ]
    )
    return head + b"\r\n" + body + b"\r\n"


def _reason(rcpt: FailedRecipient) -> str:
    """One recipient's line in the explanation, worded as Postfix words it."""
    who = f"<{_text(rcpt.address)}>"
    if rcpt.original is not None and rcpt.original != rcpt.address:
        who += f" (expanded from <{_text(rcpt.original)}>)"
    if rcpt.action == "delivered":
        return f"{who}: delivered to mailbox"
    if rcpt.action == "relayed":
        hop = f" {_host(rcpt.remote_mta)}" if rcpt.remote_mta else ""
        return f"{who}: relayed to host{hop} that does not send delivery notifications"
    diagnostic = _ascii(rcpt.diagnostic) if rcpt.diagnostic else None
    remote = _host(rcpt.remote_mta) if rcpt.remote_mta else None
    if diagnostic and remote:
        return f"{who}: host {remote} said: {diagnostic}"
    if diagnostic:
        return f"{who}: {diagnostic}"
    if remote:
        return f"{who}: delivery to host {remote} failed: {_describe(rcpt.status)}"
    return f"{who}: {_describe(rcpt.status)}"


def _describe(status: str) -> str:
    _, _, rest = status.partition(".")
    meaning = _DETAILS.get(rest) or _SUBJECTS.get(rest.partition(".")[0], "delivery failed")
    return f"{meaning} (status {status})"


def _status_part(
    host: str,
    queue_id: str,
    arrival: float,
    recipients: Sequence[FailedRecipient],
    envid: str | None = None,
) -> bytes:
    """Part 2: the machine-readable report (RFC 3464 §2.1), all 7-bit."""
    message_fields = []
    if envid is not None:
        message_fields.append(("Original-Envelope-Id", _ascii(envid)))  # RFC 3464 §2.2.1
    message_fields += [
        ("Reporting-MTA", f"dns; {host}"),
        ("X-Queue-ID", _ascii(queue_id)),  # RFC 3464 §2.4 extension field
        ("Arrival-Date", email.utils.formatdate(arrival, localtime=True)),
    ]
    blocks = [_header_lines(message_fields)]
    for rcpt in recipients:
        fields = [("Final-Recipient", _address_field(rcpt.address))]
        if rcpt.orcpt is not None:
            # RFC 3464 §2.3.1: the ORCPT the client gave, as given.
            fields.append(("Original-Recipient", _address_field(rcpt.orcpt)))
        elif rcpt.original is not None and rcpt.original != rcpt.address:
            fields.append(("Original-Recipient", _address_field(rcpt.original)))
        fields += [("Action", rcpt.action), ("Status", rcpt.status)]
        if rcpt.remote_mta:
            fields.append(("Remote-MTA", f"dns; {_host(rcpt.remote_mta)}"))
        if rcpt.diagnostic:
            diagnostic = _ascii(rcpt.diagnostic)
            # RFC 3464 §2.3.6: "smtp" only for an actual SMTP reply; our own
            # findings (DNS, TLS, expiry) get a private X- type as Postfix's.
            kind = "smtp" if rcpt.smtp_reply else "X-trio-mta"
            fields.append(("Diagnostic-Code", f"{kind}; {diagnostic}"))
        if rcpt.last_attempt is not None:
            fields.append(
                ("Last-Attempt-Date", email.utils.formatdate(rcpt.last_attempt, localtime=True))
            )
        blocks.append(_header_lines(fields))
    head = _header_lines(
        [
            ("Content-Description", "Delivery report"),
            ("Content-Type", "message/delivery-status"),
        ]
    )
    return head + b"\r\n" + b"\r\n".join(blocks)


def _returned(original: bytes, full: bool, limit: int) -> tuple[bytes, bool]:
    """Part 3 and whether it was cut: the original's headers or the whole message.

    8-bit bytes are kept as they are and declared ``8bit`` (RFC 6522 §3,
    RFC 2045 §2.8); only line ends are normalized and NULs dropped, since
    neither may appear in 8bit data.
    """
    header, body = _split_original(original)
    lines = [piece for line in header for piece in _wrap(line, b" ")]
    truncated = False
    if not full and sum(len(line) + 2 for line in lines) > limit:
        kept = _cut_fields(lines, limit)
        lines, truncated = kept, len(kept) < len(lines)
    if full:
        lines.append(b"")
        lines += [piece for line in body for piece in _wrap(line, b"")]
        if len(original) > limit:
            kept = _cut(lines, limit)
            lines, truncated = kept, len(kept) < len(lines)
    data = b"".join(line + b"\r\n" for line in lines)
    content_type, description = (
        ("message/rfc822", "Undelivered Message")
        if full
        else ("text/rfc822-headers", "Undelivered Message Headers")
    )
    encoding = "8bit" if _EIGHT_BIT.search(data) else "7bit"
    head = _header_lines(
        [
            ("Content-Description", description),
            ("Content-Type", content_type),
            ("Content-Transfer-Encoding", encoding),
        ]
    )
    return head + b"\r\n" + data, truncated


def _split_original(original: bytes) -> tuple[list[bytes], list[bytes]]:
    """Header lines and body lines of ``original``, line ends removed.

    The header section ends at the first empty line or, in a message that
    lacks one, at the first line that is neither a field nor a continuation
    (as Python's parser and most MUAs read it), so body text never passes
    for headers.
    """
    lines = _LINE_BREAK.split(original.replace(b"\0", b""))
    if lines[-1] == b"":
        lines.pop()
    header: list[bytes] = []
    for index, line in enumerate(lines):
        if line == b"":
            return header, lines[index + 1 :]
        continuation = line[:1] in (b" ", b"\t") and bool(header)
        if not continuation and not _HEADER_FIELD.match(line):
            return header, lines[index:]
        header.append(line)
    return header, []


def _cut(lines: list[bytes], limit: int) -> list[bytes]:
    """The leading whole lines whose CRLF-terminated size fits in ``limit``."""
    size = 0
    for index, line in enumerate(lines):
        size += len(line) + 2
        if size > limit:
            return lines[:index]
    return lines


def _cut_fields(lines: list[bytes], limit: int) -> list[bytes]:
    """The leading whole header fields (with their continuation lines) that fit in ``limit``."""
    kept = _cut(lines, limit)
    end = len(kept)
    if end < len(lines):
        # Drop a field whose continuation lines did not all fit.
        while end > 0 and lines[end][:1] in (b" ", b"\t"):
            end -= 1
    return lines[:end]


def _wrap(line: bytes, continuation: bytes) -> list[bytes]:
    """Split a line longer than 998 octets, never inside a UTF-8 sequence.

    Only lines that already break RFC 5322 §2.1.1 are touched; header lines
    continue with a space so the field stays one field (§2.2.3).
    """
    pieces = []
    while len(line) > MAX_LINE:
        cut = MAX_LINE
        while cut > MAX_LINE - 4 and (line[cut] & 0xC0) == 0x80:
            cut -= 1
        pieces.append(line[:cut])
        line = continuation + line[cut:]
    pieces.append(line)
    return pieces


# --- field formatting ------------------------------------------------------


def _header_lines(fields: Sequence[tuple[str, str]]) -> bytes:
    return b"".join(
        line.encode("utf-8") + b"\r\n" for name, value in fields for line in _fold(name, value)
    )


def _fold(name: str, value: str) -> list[str]:
    """One field as physical lines: folded at spaces near 78 octets, never past 998.

    RFC 5322 §2.2.3 folding inserts CRLF before existing whitespace, so the
    value unfolds to what it was. A single word too long for a line is split
    with an added space (RFC 5322 §2.1.1 leaves no other way).
    """
    lines: list[str] = []
    current = f"{name}:"
    started = False
    for word in value.split(" "):
        if not word:
            continue
        if started and _octets(current) + 1 + _octets(word) > _FOLD_AT:
            lines.append(current)
            current = ""
        current += " " + word
        started = True
    lines.append(current)
    return [piece for line in lines for piece in _split_long(line)]


def _split_long(line: str) -> list[str]:
    pieces: list[str] = []
    current, size = "", 0
    for char in line:
        width = _octets(char)
        if size + width > MAX_LINE:
            pieces.append(current)
            current, size = " ", 1
        current += char
        size += width
    pieces.append(current)
    return pieces


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def _text(value: str) -> str:
    """Header-safe text: whitespace runs (CR/LF included) become one space and
    other control characters become "?", so no value can start a new field."""
    collapsed = _WHITESPACE.sub(" ", value).strip()
    return "".join("?" if unicodedata.category(c) == "Cc" else c for c in collapsed)


def _ascii(value: str) -> str:
    """``_text`` restricted to ASCII: the report part is 7-bit (RFC 3464 §2.1)."""
    return _text(value).encode("ascii", "replace").decode("ascii")


def _host(name: str) -> str:
    """A host name for ``dns;`` fields: A-labels for internationalized names."""
    try:
        return _text(name).encode("idna").decode("ascii")
    except UnicodeError:
        return _ascii(name)


def _address_field(address: str) -> str:
    """``address-type; address`` (RFC 3464 §2.3.2), 7-bit even for SMTPUTF8
    addresses, which use RFC 6533 §3's ``utf-8`` type in its xtext form."""
    clean = _text(address)
    if clean.isascii():
        return f"rfc822; {clean}"
    return "utf-8; " + "".join(
        c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):02X}}}" for c in clean
    )


def _token(queue_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]", "", queue_id) or "unknown"


def _boundary(parts: Sequence[bytes]) -> str:
    """A random boundary that occurs in none of the parts (RFC 2046 §5.1.1)."""
    while True:
        boundary = f"=_bounce_{secrets.token_hex(12)}"
        if not any(b"--" + boundary.encode("ascii") in part for part in parts):
            return boundary
