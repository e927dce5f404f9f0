#!/usr/bin/env python3
"""Throughput of the sans-IO SMTP core (trio_mta.smtp), no sockets involved.

    python bench/protocol.py              # runs of 0.5 s, best of 5 per figure
    python bench/protocol.py --seconds 2  # steadier figures on a busy machine

Figures (the goals for a 2-core machine in brackets; never asserted):

- commands parsed per second by ``parse_command`` over a MAIL/RCPT/EHLO/DATA
  mix [>= 200 000/s];
- DATA framing: ``DataReader.feed`` over dot-stuffed wire data of realistic
  text (header block, 40-80 character lines, 1 % starting with a dot) in
  64 KiB reads, for 1 KiB, 64 KiB and 10 MiB bodies [>= 500 MB/s at 64 KiB
  and 10 MiB];
- ``dot_stuff`` on the same bodies (the client side of the same framing);
- ``ServerConnection``: complete pipelined transactions (MAIL, 2 RCPT, DATA,
  1 KiB body) per second through the whole machine, decisions answered at once.

Each figure is the best of five runs of at least ``--seconds``: on a shared
machine the best run is the one least disturbed by others.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from trio_mta.smtp import (
    NEED_DATA,
    DataReader,
    EndOfMessage,
    MailFrom,
    RcptTo,
    Reply,
    ServerConnection,
    dot_stuff,
    parse_command,
)

READ_SIZE = 65536
COMMANDS = [
    b"EHLO client.example.org",
    b"MAIL FROM:<alice.sender@example.org> SIZE=24576 BODY=8BITMIME",
    b"RCPT TO:<bob@example.net>",
    b"RCPT TO:<carol.smith+list@mail.example.com>",
    b"DATA",
]
WORDS = (
    b"the quick brown fox jumps over a lazy dog while mail servers queue "
    b"messages for delivery to remote hosts across the internet today."
).split()


def best_rate(run: Callable[[], int], seconds: float) -> float:
    """Units per second of ``run`` (which returns units done), best of five."""
    best = 0.0
    for _ in range(5):
        done = 0
        start = time.perf_counter()
        while True:
            done += run()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        best = max(best, done / elapsed)
    return best


def message(size: int, rng: random.Random) -> bytes:
    """A plausible RFC 5322 message of ``size`` octets with LF line ends."""
    lines = [
        b"From: Alice <alice@example.org>",
        b"To: bob@example.net",
        b"Subject: benchmark message",
        b"Message-ID: <bench@example.org>",
        b"",
    ]
    total = sum(len(line) + 1 for line in lines)
    while total < size:
        line = b" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 13)))
        if rng.random() < 0.01:
            line = b"." + line
        lines.append(line)
        total += len(line) + 1
    return b"\n".join(lines)[:size]


def reads(data: bytes) -> list[bytes]:
    return [data[i : i + READ_SIZE] for i in range(0, len(data), READ_SIZE)]


def bench_commands(seconds: float) -> float:
    batch = COMMANDS * 200

    def run() -> int:
        for line in batch:
            parse_command(line)
        return len(batch)

    return best_rate(run, seconds)


def bench_framing(size: int, seconds: float, rng: random.Random) -> tuple[float, float]:
    """(DataReader MB/s, dot_stuff MB/s) for one body size."""
    body = message(size, rng)
    wire = dot_stuff(body)
    chunks = reads(wire)
    repeat = max(1, (1 << 20) // len(wire))

    def read() -> int:
        for _ in range(repeat):
            reader = DataReader(1 << 30)
            for chunk in chunks:
                _, rest = reader.feed(chunk)
            assert rest == b"" and not reader.bad_line_ending
        return len(wire) * repeat

    def stuff() -> int:
        for _ in range(repeat):
            dot_stuff(body)
        return len(body) * repeat

    return best_rate(read, seconds) / 1e6, best_rate(stuff, seconds) / 1e6


def bench_server(seconds: float, rng: random.Random) -> float:
    transaction = (
        b"MAIL FROM:<alice@example.org> SIZE=1024\r\nRCPT TO:<bob@example.net>\r\n"
        b"RCPT TO:<carol@example.net>\r\nDATA\r\n" + dot_stuff(message(1024, rng))
    )
    count = 50
    stream = reads(b"EHLO client.example.org\r\n" + transaction * count + b"QUIT\r\n")
    ok_mail, ok_rcpt = Reply(250, "2.1.0", "Ok"), Reply(250, "2.1.5", "Ok")
    queued = Reply(250, "2.0.0", "Ok: queued as BENCH")

    def run() -> int:
        server = ServerConnection(
            hostname="mx.example.org", max_message_size=1 << 25, max_recipients=100, starttls=False
        )
        server.send_reply(Reply(220, None, "mx.example.org ESMTP"))
        messages = 0
        for chunk in stream:
            server.receive_data(chunk)
            while (event := server.next_event()) is not NEED_DATA:
                if isinstance(event, MailFrom):
                    server.send_reply(ok_mail)
                elif isinstance(event, RcptTo):
                    server.send_reply(ok_rcpt)
                elif isinstance(event, EndOfMessage):
                    server.send_reply(queued)
                    messages += 1
                elif server.closed:
                    break
            server.data_to_send()
        assert messages == count
        return messages

    return best_rate(run, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=0.5,
        help="minimum duration of each of the five runs per figure",
    )
    args = parser.parse_args()
    rng = random.Random(5321)
    print(
        f"parse_command (MAIL/RCPT/EHLO/DATA mix): {bench_commands(args.seconds):12,.0f} commands/s"
    )
    for label, size in (("1 KiB", 1024), ("64 KiB", 65536), ("10 MiB", 10 << 20)):
        framing, stuffing = bench_framing(size, args.seconds, rng)
        print(
            f"DataReader framing, {label:>6} bodies in 64 KiB reads: {framing:8.0f} MB/s"
            f"   (dot_stuff: {stuffing:6.0f} MB/s)"
        )
    print(
        f"ServerConnection, pipelined MAIL+2 RCPT+DATA+1 KiB: "
        f"{bench_server(args.seconds, rng):10,.0f} messages/s"
    )


if __name__ == "__main__":
    main()
