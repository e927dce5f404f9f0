#!/usr/bin/env python3
"""atheris harness for the PROXY protocol parser (``trio_mta.proxy``).

Beyond "no exception but ProxyHeaderError", it checks that the outcome does not
depend on how the bytes arrive (the first input byte picks where to split the
rest), that a parsed header never claims more bytes than it was given, and that
a TCP header formats back into bytes that parse to the same header.

    python fuzz/fuzz_proxy.py fuzz/corpus-proxy fuzz/seeds/proxy
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from trio_mta.proxy import (
        NEED_DATA,
        ProxyHeaderError,
        ProxyHeaderReader,
        format_v1,
        format_v2,
        parse_header,
    )


def _outcome(data: bytes) -> object:
    try:
        result = parse_header(data)
    except ProxyHeaderError:
        return ProxyHeaderError
    if result is NEED_DATA:
        return NEED_DATA
    header, used = result
    if not 0 < used <= len(data):
        raise AssertionError(f"{data!r}: header of {used} bytes out of {len(data)}")
    return header, data[used:]


def _split_outcome(data: bytes, cut: int) -> object:
    """The reader's outcome when ``data`` arrives as two pieces, cut at ``cut``."""
    reader = ProxyHeaderReader()
    try:
        reader.receive_data(data[:cut])
        event = reader.next_event()
        reader.receive_data(data[cut:])
        if event is NEED_DATA:
            event = reader.next_event()
    except ProxyHeaderError:
        return ProxyHeaderError
    if event is NEED_DATA:
        return NEED_DATA
    return event, reader.trailing_data


def test_one_input(data: bytes) -> None:
    if not data:
        return
    raw = data[1:]
    cut = data[0] % (len(raw) + 1)
    whole = _outcome(raw)
    split = _split_outcome(raw, cut)
    if split != whole:
        raise AssertionError(f"{raw!r}: split at {cut} gives {split!r}, whole {whole!r}")
    if isinstance(whole, tuple):
        header = whole[0]
        if header.source is not None:
            again = format_v1(header) if header.version == 1 else format_v2(header)
            if _outcome(again) != (header, b""):
                raise AssertionError(f"{raw!r}: {header!r} formats back as {again!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
