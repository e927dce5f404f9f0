"""Text and JSON for `trio-mta queue list` and `queue show`.

Input is what QueueStore.list_messages / show return (timestamps already ISO-8601
"Z"). JSON output is exactly those objects (SPEC §8). Human output follows
Postfix's mailq: one block per message, one line per recipient, the last error
under it. Text that came from the network (addresses, errors, headers) is
escaped so control characters cannot play tricks on the admin's terminal.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any


def _clean(text: object) -> str:
    out = []
    for ch in str(text):
        if ch != "\t" and unicodedata.category(ch).startswith("C"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def _parse(stamp: str | None) -> float | None:
    if not stamp:
        return None
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            whole, rest = divmod(seconds, size)
            small = {"d": ("h", 3600), "h": ("m", 60), "m": ("s", 1)}[unit]
            part = rest // small[1]
            return f"{whole}{unit}{part:02d}{small[0]}" if part else f"{whole}{unit}"
    return f"{seconds}s"


def _when(stamp: str | None, now: float) -> str:
    ts = _parse(stamp)
    if ts is None:
        return "-"
    if ts <= now:
        return "now"
    return f"{stamp} (in {_span(ts - now)})"


def _recipient_lines(
    rcpt: Mapping[str, Any], now: float, indent: str, *, address: bool = True
) -> list[str]:
    status = rcpt["status"]
    line = f"{indent}{status:<9}  "
    if address:
        line += f"<{_clean(rcpt['address'])}>  "
    line += f"attempts {rcpt['attempts']}"
    if status in ("pending", "deferred"):
        line += f", next retry {_when(rcpt.get('next_attempt'), now)}"
    lines = [line]
    if rcpt.get("last_error"):
        lines.append(f"{indent}{'':<9}  {_clean(rcpt['last_error'])}")
    return lines


def format_list(
    rows: Sequence[Mapping[str, Any]], *, json_output: bool, now: float | None = None
) -> str:
    """`queue list` output (no trailing newline)."""
    if json_output:
        return json.dumps(list(rows), indent=2)
    if not rows:
        return "Mail queue is empty"
    now = time.time() if now is None else now
    lines = [f"{'ID':<18} {'AGE':>6} {'SIZE':>9}  SENDER"]
    waiting = 0
    total = 0
    for row in rows:
        received = _parse(row["received_at"])
        age = _span(now - received) if received is not None else "?"
        sender = _clean(row["sender"]) if row["sender"] else ""
        lines.append(f"{row['id']:<18} {age:>6} {row['size']:>9}  <{sender}>")
        for rcpt in row["recipients"]:
            lines.extend(_recipient_lines(rcpt, now, "    "))
            waiting += rcpt["status"] in ("pending", "deferred")
        total += int(row["size"])
        lines.append("")
    count = len(rows)
    lines.append(
        f"-- {count} message{'s' * (count != 1)}, {total} bytes,"
        f" {waiting} recipient{'s' * (waiting != 1)} waiting"
    )
    return "\n".join(lines)


def format_show(info: Mapping[str, Any], *, now: float | None = None) -> str:
    """`queue show ID` output (no trailing newline)."""
    now = time.time() if now is None else now
    received = _parse(info["received_at"])
    ago = f" ({_span(now - received)} ago)" if received is not None else ""
    fields = [
        ("Queue ID", info["id"]),
        ("Sender", f"<{_clean(info['sender'])}>"),
        ("Received", f"{info['received_at']}{ago}"),
        ("Size", f"{info['size']} bytes"),
    ]
    for key, value in sorted(dict(info.get("meta") or {}).items()):
        if value:
            fields.append((_clean(key).replace("_", " ").capitalize(), _clean(value)))
    width = max(len(name) for name, _ in fields) + 3
    lines = [f"{name + ':':<{width}}{value}" for name, value in fields]
    lines += ["", "Recipients:"]
    for rcpt in info["recipients"]:
        where = f"mailbox {_clean(rcpt['mailbox'])}" if rcpt.get("mailbox") else "remote"
        if rcpt.get("original") and rcpt["original"] != rcpt["address"]:
            where += f", for <{_clean(rcpt['original'])}>"
        lines.append(f"  <{_clean(rcpt['address'])}>  ({where})")
        lines.extend(_recipient_lines(rcpt, now, "    ", address=False))
        for attempt in rcpt.get("history", []):
            lines.append(
                f"      {attempt['at']}  {attempt['outcome']:<9}  {_clean(attempt['detail'])}"
            )
    lines += ["", "Headers:"]
    lines += [f"  {_clean(line)}" for line in str(info.get("headers", "")).splitlines()]
    return "\n".join(lines)
