"""Durations as the configuration writes them: seconds, or ``"30s"``, ``"5m"``, ``"1h30m"``.

Kept apart from :mod:`trio_mta.config` because the CLI (``queue list`` ages) and the
scheduler want the same spelling for output.
"""

from __future__ import annotations

import math
import re

__all__ = ["DURATION_HINT", "format_duration", "parse_duration"]

# Largest unit first: parse_duration requires this order ("1h30m", never "30m1h"),
# format_duration produces it.
_UNITS: dict[str, int] = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

DURATION_HINT = 'must be a duration: seconds, or a string like "30s", "5m", "2h", "5d", "1h30m"'


def parse_duration(value: object) -> float:
    """Return *value* in seconds (a non-negative finite float).

    Accepts an int or float (seconds), a string holding a plain number (seconds), or a
    string of ``<number><unit>`` parts with units w, d, h, m, s in decreasing order, optionally
    separated by spaces. Raises :class:`ValueError` with a message fit for a config error.
    """
    if isinstance(value, bool):  # TOML true/false are ints to Python: never a duration
        raise ValueError(DURATION_HINT)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value)
    else:
        raise ValueError(DURATION_HINT)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(DURATION_HINT)
    return seconds


def _parse_text(text: str) -> float:
    compact = "".join(text.split())
    if _NUMBER.fullmatch(compact):
        return float(compact)
    parts = _PART.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(DURATION_HINT)
    order = list(_UNITS)
    positions = [order.index(unit) for _, unit in parts]
    if positions != sorted(set(positions)):  # each unit once, largest first
        raise ValueError(DURATION_HINT)
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """Render *seconds* the way the config spells it: ``5400`` -> ``"1h30m"``.

    Whole seconds only (rounded); zero is ``"0s"``; negative values get a leading ``-``.
    """
    total = round(seconds)
    sign = "-" if total < 0 else ""
    total = abs(total)
    out = []
    for unit, size in _UNITS.items():
        count, total = divmod(total, size)
        if count:
            out.append(f"{count}{unit}")
    return sign + ("".join(out) or "0s")
