"""One line per event (SPEC §6), as text or JSON.

Events are named (``smtpd.accepted``, ``delivery.attempt`` ...) and carry
key=value fields, so an operator can grep a queue ID through its whole life.
Passwords never reach this module: callers pass only what may be logged.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Literal

LOGGER_NAME = "trio_mta"
_logger = logging.getLogger(LOGGER_NAME)
_FIELDS = "trio_mta_fields"
# Fields every line of this process carries, after its own: ``worker=K`` under
# a supervisor, so interleaved lines from several workers can be told apart.
_context: dict[str, object] = {}


def _timestamp(created: float) -> str:
    whole = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", whole) + f".{int(created % 1 * 1000):03d}Z"


# Characters that must never reach a log line raw, whoever supplied them: C0 and
# C1 controls and DEL (NUL makes grep call the file binary, ESC drives the
# terminal, NEL/VT/FF/FS.. split lines for str.splitlines), the Unicode line and
# paragraph separators, the bidirectional overrides and isolates (they make a
# line read differently than it is) and lone surrogates (not encodable).
_UNSAFE_CLASS = "\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(f"[{_UNSAFE_CLASS}]")
_TEXT_ESCAPE = re.compile(f'["\\\\{_UNSAFE_CLASS}]')
_TEXT_QUOTE = re.compile(f'[\\s"=\\\\{_UNSAFE_CLASS}]')


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char in '"\\':
        return "\\" + char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every unsafe character as ``\\xNN``/``\\uNNNN`` (and ``\\``, ``"``)."""
    return _TEXT_ESCAPE.sub(_escape_char, text)


def _text_value(value: object) -> str:
    """A field value as one token: bare when it is plain, else quoted and escaped."""
    text = str(value)
    if text == "" or _TEXT_QUOTE.search(text):
        return f'"{escape(text)}"'
    return text


class TextFormatter(logging.Formatter):
    """``2026-11-27T20:00:00.123Z info smtpd.accepted id=... code=250``.

    Field values are mostly client-supplied (HELO names, addresses, AUTH user
    names, reply text), so escaping happens here, once, for every event.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = getattr(record, _FIELDS, {})
        message = record.getMessage()
        if _UNSAFE.search(message):
            message = _UNSAFE.sub(_escape_char, message)
        parts = [_timestamp(record.created), record.levelname.lower(), message]
        parts.extend(f"{key}={_text_value(value)}" for key, value in fields.items())
        return " ".join(parts)


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``{"ts": ..., "level": ..., "event": ..., fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = getattr(record, _FIELDS, {})
        obj: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        obj.update(fields)
        # json escapes C0 itself; DEL, C1, U+2028/2029 and the rest would stay raw
        # (valid JSON, but they split or garble the line for line-based readers).
        return _UNSAFE.sub(_json_escape, json.dumps(obj, ensure_ascii=False, default=str))


def setup(
    level: str = "info",
    file: Path | None = None,
    fmt: Literal["text", "json"] = "text",
) -> None:
    """Route trio_mta's events to stderr or a file, replacing earlier handlers."""
    handler: logging.Handler
    if file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for old in list(_logger.handlers):
        _logger.removeHandler(old)
        old.close()
    _logger.addHandler(handler)
    _logger.setLevel(level.upper())
    _logger.propagate = False


def set_context(**fields: Any) -> None:
    """Add fields to every later line of this process (``None`` removes one)."""
    for key, value in fields.items():
        if value is None:
            _context.pop(key, None)
        else:
            _context[key] = value


def event(name: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event; ``None`` fields are left out so lines stay short."""
    if not _logger.isEnabledFor(level):
        return
    clean = {key: value for key, value in fields.items() if value is not None}
    clean.update(_context)
    _logger.log(level, name, extra={_FIELDS: clean})


def debug(name: str, **fields: Any) -> None:
    event(name, level=logging.DEBUG, **fields)


def warning(name: str, **fields: Any) -> None:
    event(name, level=logging.WARNING, **fields)


def error(name: str, **fields: Any) -> None:
    event(name, level=logging.ERROR, **fields)
