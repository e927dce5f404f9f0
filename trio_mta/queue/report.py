"""Text and JSON for `trio-mta queue list` and `queue show`.

Input is what QueueStore.list_messages / show return: dataclasses with unix
times; this module alone turns them into text. JSON output has the shape of
SPEC §8 (ISO-8601 "Z" times). Human output follows Postfix's mailq: one block
per message, one line per recipient, the last error under it. Text that came
from the network (addresses, errors, headers) is escaped so control characters
cannot play tricks on the admin's terminal.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from trio_mta.queue.store import UNFINISHED, QueuedMessage, RecipientState


def iso(ts: float | None) -> str | None:
    """Unix time as ISO-8601 UTC with a "Z", as SPEC §8 shows."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def message_json(message: QueuedMessage) -> dict[str, Any]:
    """One element of `queue list --json` (SPEC §8)."""
    return {
        "id": message.id,
        "sender": message.sender,
        "received_at": iso(message.received_at),
        "size": message.size,
        "recipients": [
            {
                "address": r.address,
                "status": r.status,
                "attempts": r.attempts,
                "next_attempt": iso(r.next_attempt),
                "last_error": r.last_error,
            }
            for r in message.recipients
        ],
        # Only for a message set aside as damaged (docs/queue.md "Damage").
        **({"damaged": message.damaged} if message.damaged else {}),
    }


def _clean(text: object) -> str:
    out = []
    for ch in str(text):
        if ch != "\t" and unicodedata.category(ch).startswith("C"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            whole, rest = divmod(seconds, size)
            small = {"d": ("h", 3600), "h": ("m", 60), "m": ("s", 1)}[unit]
            part = rest // small[1]
            return f"{whole}{unit}{part:02d}{small[0]}" if part else f"{whole}{unit}"
    return f"{seconds}s"


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    if ts <= now:
        return "now"
    return f"{iso(ts)} (in {_span(ts - now)})"


def _recipient_lines(
    rcpt: RecipientState, now: float, indent: str, *, address: bool = True
) -> list[str]:
    line = f"{indent}{rcpt.status:<9}  "
    if address:
        line += f"<{_clean(rcpt.address)}>  "
    line += f"attempts {rcpt.attempts}"
    if rcpt.status in UNFINISHED:
        line += f", next retry {_when(rcpt.next_attempt, now)}"
    lines = [line]
    if rcpt.last_error:
        lines.append(f"{indent}{'':<9}  {_clean(rcpt.last_error)}")
    return lines


def format_list(
    rows: Sequence[QueuedMessage], *, json_output: bool, now: float | None = None
) -> str:
    """`queue list` output (no trailing newline)."""
    if json_output:
        return json.dumps([message_json(row) for row in rows], indent=2)
    if not rows:
        return "Mail queue is empty"
    now = time.time() if now is None else now
    lines = [f"{'ID':<18} {'AGE':>6} {'SIZE':>9}  SENDER"]
    waiting = 0
    total = 0
    for row in rows:
        age = _span(now - row.received_at)
        sender = _clean(row.sender) if row.sender else ""
        lines.append(f"{row.id:<18} {age:>6} {row.size:>9}  <{sender}>")
        if row.damaged:
            lines.append(f"    DAMAGED, set aside: {_clean(row.damaged)}")
        for rcpt in row.recipients:
            lines.extend(_recipient_lines(rcpt, now, "    "))
            waiting += rcpt.status in UNFINISHED
        total += row.size
        lines.append("")
    count = len(rows)
    lines.append(
        f"-- {count} message{'s' * (count != 1)}, {total} bytes,"
        f" {waiting} recipient{'s' * (waiting != 1)} waiting"
    )
    return "\n".join(lines)


def format_show(info: QueuedMessage, *, now: float | None = None) -> str:
    """`queue show ID` output (no trailing newline)."""
    now = time.time() if now is None else now
    fields = [
        ("Queue ID", info.id),
        ("Sender", f"<{_clean(info.sender)}>"),
        ("Received", f"{iso(info.received_at)} ({_span(now - info.received_at)} ago)"),
        ("Size", f"{info.size} bytes"),
    ]
    for key, value in sorted(dict(info.meta).items()):
        if value:
            fields.append((_clean(key).replace("_", " ").capitalize(), _clean(value)))
    width = max(len(name) for name, _ in fields) + 3
    lines = [f"{name + ':':<{width}}{value}" for name, value in fields]
    lines += ["", "Recipients:"]
    for rcpt in info.recipients:
        where = f"mailbox {_clean(rcpt.mailbox)}" if rcpt.mailbox else "remote"
        if rcpt.original and rcpt.original != rcpt.address:
            where += f", for <{_clean(rcpt.original)}>"
        lines.append(f"  <{_clean(rcpt.address)}>  ({where})")
        lines.extend(_recipient_lines(rcpt, now, "    ", address=False))
        for attempt in rcpt.history:
            lines.append(
                f"      {iso(attempt.at)}  {attempt.outcome.kind:<9}  {_clean(attempt.detail)}"
            )
    lines += ["", "Headers:"]
    lines += [f"  {_clean(line)}" for line in info.headers.splitlines()]
    return "\n".join(lines)
