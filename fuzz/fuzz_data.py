#!/usr/bin/env python3
"""atheris harness for the DATA framing and the whole server machine.

From one input it derives split points and a payload, then checks:

- ``DataReader`` gives the same body, remainder and flags for the payload in
  one piece and split at the points, and agrees with the RFC 5321 §4.5.2
  definition (the stream, preceded by CRLF, ends at the first CRLF.CRLF);
- ``ServerConnection`` fed the payload after an envelope (so DATA and BDAT
  are reached) never raises, emits the same events and replies for both
  splits, and never reports more messages than the client could end.

    python fuzz/fuzz_data.py fuzz/corpus-data fuzz/seeds/data
"""

from __future__ import annotations

import itertools
import sys

import atheris

with atheris.instrument_imports():
    from trio_mta.smtp import (
        NEED_DATA,
        AuthAttempt,
        BodyChunk,
        ConnectionClosed,
        DataReader,
        EndOfMessage,
        Event,
        MailFrom,
        MessageRefused,
        RcptTo,
        Reply,
        ServerConnection,
        StartTlsRequest,
    )

PREFIXES = (
    b"",
    b"EHLO fuzz\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
    b"EHLO fuzz\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n",
    b"EHLO fuzz\r\n",
)
ANSWERS = {
    MailFrom: Reply(250, "2.1.0", "Ok"),
    RcptTo: Reply(250, "2.1.5", "Ok"),
    EndOfMessage: Reply(250, "2.0.0", "Ok"),
    StartTlsRequest: Reply(454, "4.7.0", "No TLS"),
    AuthAttempt: Reply(535, "5.7.8", "No"),
}


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def read(chunks: list[bytes]) -> tuple[bytes, bytes | None, bool, bool, int]:
    reader = DataReader(1 << 16)
    body = []
    for i, chunk in enumerate(chunks):
        out, rest = reader.feed(chunk)
        body.append(out)
        if rest is not None:
            rest += b"".join(chunks[i + 1 :])
            return b"".join(body), rest, reader.bad_line_ending, reader.too_big, reader.size
    return b"".join(body), None, reader.bad_line_ending, reader.too_big, reader.size


def converse(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    server = ServerConnection(
        hostname="mx",
        max_message_size=2048,
        max_recipients=5,
        starttls=True,
        auth_requires_tls=False,
        max_errors=50,
    )
    server.send_reply(Reply(220, None, "mx"))
    events: list[Event] = []
    for chunk in [*[c for c in chunks if c], b""]:
        if server.closed:
            break
        server.receive_data(chunk)
        while True:
            event = server.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, BodyChunk) and events and isinstance(events[-1], BodyChunk):
                events[-1] = BodyChunk(events[-1].data + event.data)
            else:
                events.append(event)
            if isinstance(event, ConnectionClosed):
                break
            answer = ANSWERS.get(type(event))
            if answer is not None:
                server.send_reply(answer)
    return events, server.data_to_send()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    prefix = PREFIXES[fdp.ConsumeIntInRange(0, len(PREFIXES) - 1)]
    cuts = [fdp.ConsumeIntInRange(0, 1 << 16) for _ in range(fdp.ConsumeIntInRange(0, 6))]
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())

    whole = read([payload])
    if read(split(payload, cuts)) != whole:
        raise AssertionError(f"DataReader depends on the split: {payload!r} {cuts}")
    stream = b"\r\n" + payload
    end = stream.find(b"\r\n.\r\n")
    if (end >= 0) != (whole[1] is not None):
        raise AssertionError(f"end marker disagreement: {payload!r}")
    if end >= 0:
        stuffed = stream[: end + 2]
        crlf = stuffed.count(b"\r\n")
        bad = crlf != stuffed.count(b"\r") or crlf != stuffed.count(b"\n")
        expected = stuffed.replace(b"\r\n.", b"\r\n")[2:]
        if (
            whole[2] != bad
            or whole[4] != len(expected)
            or (not whole[3] and whole[0] != expected)
            or whole[1] != stream[end + 5 :]
        ):
            raise AssertionError(f"DataReader disagrees with RFC 5321 §4.5.2: {payload!r}")

    wire = prefix + payload
    events, out = converse([wire])
    if converse(split(wire, cuts)) != (events, out):
        raise AssertionError(f"ServerConnection depends on the split: {wire!r} {cuts}")
    messages = sum(isinstance(e, (EndOfMessage, MessageRefused)) for e in events)
    if messages > wire.count(b"\r\n.\r\n") + wire.upper().count(b"BDAT"):
        raise AssertionError(f"more messages than possible ends: {wire!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
