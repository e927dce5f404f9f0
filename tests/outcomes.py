"""Outcomes for tests, written as the text people read: o("deferred", "451 4.3.0 x")."""

from __future__ import annotations

import re

from trio_mta.delivery.outcome import Kind, Outcome

_REPLY = re.compile(r"(?:(\d{3}) )?(?:([245]\.\d{1,3}\.\d{1,3}) ?)?(.*)", re.DOTALL)
_DEFAULT = {"delivered": "2.0.0", "deferred": "4.0.0", "failed": "5.0.0"}


def o(kind: Kind, reply: str, **fields: object) -> Outcome:
    """``"451 4.3.0 try later"`` -> code 451, status 4.3.0, text "try later"."""
    match = _REPLY.fullmatch(reply)
    assert match is not None
    code, status, text = match.groups()
    return Outcome(kind, status or _DEFAULT[kind], text, int(code) if code else None, **fields)  # type: ignore[arg-type]
