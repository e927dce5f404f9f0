"""Queue IDs: unique across hosts and restarts, sortable by time, safe in file names.

An ID is 12 characters of Crockford base32 (microseconds since the epoch shifted
left by 8 bits, plus a per-process counter in the low bits) followed by "-" and a
short tag derived from the host name, followed under ``[server] workers`` by two
characters naming the worker. DESIGN.md "Scaling past one machine": several
instances share Maildir storage and logs, so an ID must name its host; workers of
one host start in the same microsecond often enough that it must name the worker too.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TIME_CHARS = 12
_TAG_CHARS = 4
_TAG_RE = re.compile(r"[0-9A-Z]{1,8}")
_ID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{12}-[0-9A-Z]{1,8}")

_lock = threading.Lock()
# Random low bits at start-up make two processes that start in the same
# microsecond on one host unlikely to collide; within a process the counter
# below makes collisions impossible.
_last = random.getrandbits(8)


def _encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def host_tag_for(hostname: str) -> str:
    """A stable 4-character tag for `hostname` (case-insensitive)."""
    digest = hashlib.sha256(hostname.strip().lower().encode("utf-8")).digest()
    return _encode(int.from_bytes(digest[:3], "big") >> 4, _TAG_CHARS)


host_tag = host_tag_for  # the name serve() uses

WORKER_CHARS = 2


def worker_tag(host_tag: str, worker: int) -> str:
    """``host_tag`` plus the worker number: IDs of two workers can never collide."""
    if not 0 <= worker < 32**WORKER_CHARS:
        raise ValueError(f"worker number must be 0..{32**WORKER_CHARS - 1}, got {worker}")
    return host_tag + _encode(worker, WORKER_CHARS)


def new_queue_id(host_tag: str) -> str:
    """Return a fresh ID; strictly increasing within this process.

    60 bits hold microseconds << 8 until the year 2112; if the clock steps back
    the counter keeps counting up from the last value, so IDs stay unique.
    """
    if not _TAG_RE.fullmatch(host_tag):
        raise ValueError(f"host tag must be 1-8 characters of [0-9A-Z], got {host_tag!r}")
    global _last
    with _lock:
        value = max((time.time_ns() // 1000) << 8, _last + 1)
        _last = value
    return f"{_encode(value & ((1 << 60) - 1), _TIME_CHARS)}-{host_tag}"


def is_queue_id(text: str) -> bool:
    """True when `text` has the shape of a queue ID (for CLI argument checks)."""
    return _ID_RE.fullmatch(text) is not None
