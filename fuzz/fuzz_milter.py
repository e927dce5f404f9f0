#!/usr/bin/env python3
"""atheris harness for what a hostile milter sends back to ``Milter``.

The first input byte picks the stage the MTA is waiting in (option
negotiation, a stage that may only continue, the body, or end of message),
the next two how the input is cut into reads; the rest is the milter's byte
stream. Oracle: the only exception is ``MilterProtocolError``, every verdict
names a known action, and every modification a known kind.

    python fuzz/fuzz_milter.py fuzz/corpus-milter fuzz/seeds/milter
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from trio_mta.milter import protocol as p

STAGES = ("connect", "mail", "rcpt", "header", "body", "eom")
ACTIONS = {"accept", "continue", "reject", "tempfail", "discard", "skip"}
KINDS = {
    "add_header",
    "insert_header",
    "change_header",
    "change_from",
    "add_rcpt",
    "delete_rcpt",
    "replace_body",
    "quarantine",
}


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    milter = p.Milter(max_packet=4096)
    cut = max(1, data[1] * 256 + data[2])
    stream = data[3:]
    try:
        milter.optneg()
        if data[0] & 1:
            milter.receive_data(p.packet(b"O", bytes([0, 0, 0, 6, 0, 0, 1, 0xFF, 0, 0, 0, 0])))
            milter.next_event()
            milter.stage(STAGES[(data[0] >> 1) % len(STAGES)], b"x")
        for start in range(0, len(stream), cut):
            milter.receive_data(stream[start : start + cut])
            while True:
                event = milter.next_event()
                if event is None:
                    break
                if isinstance(event, p.Verdict):
                    assert event.action in ACTIONS, event
                    assert all(m.kind in KINDS for m in event.modifications), event
                    if event.reply is not None:
                        assert 400 <= event.reply.code < 600, event
                    if milter.negotiated:  # go on talking, as the client would
                        milter.stage("eom")
    except p.MilterProtocolError:
        return


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
