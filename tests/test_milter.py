"""Milters at work in the server (SPEC §11): verdicts, modifications, failures.

A scripted milter (tests/fakemilter.py) on a real loopback socket plays each
verdict and modification; smtplib plays the client; delivery lands in Maildir.
"""

from __future__ import annotations

import email
import smtplib
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

import trio_mta
from trio_mta.config import Config

from .fakemilter import FakeMilter, pkt
from .maildirs import new_files, wait_for_mail

MESSAGE = b"From: s@remote.test\r\nSubject: hello\r\nX-Old: one\r\nX-Old: two\r\n\r\nbody text\r\n"


async def _start(
    nursery: trio.Nursery, make_config: Callable[..., Config], *milters: dict[str, object]
) -> trio_mta.MTA:
    mta: trio_mta.MTA = await nursery.start(
        lambda task_status: trio_mta.serve(
            make_config(milter=list(milters)), task_status=task_status
        )
    )
    return mta


def _send(
    port: int, rcpts: tuple[str, ...] = ("bob@example.test",), data: bytes = MESSAGE
) -> list[tuple[int, bytes]]:
    """(code, text) of MAIL, each RCPT and DATA (DATA only if a RCPT was accepted)."""
    out: list[tuple[int, bytes]] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("c.test")
        out.append(client.mail("s@remote.test"))
        if out[0][0] != 250:
            return out
        for rcpt in rcpts:
            out.append(client.rcpt(rcpt))
        if any(code == 250 for code, _ in out[1:]):
            try:
                out.append(client.data(data))
            except smtplib.SMTPDataError as exc:
                out.append((exc.smtp_code, exc.smtp_error))
    return out


async def _run(fn: Callable[[], list[tuple[int, bytes]]]) -> list[tuple[int, bytes]]:
    return await trio.to_thread.run_sync(fn)


async def _milter(nursery: trio.Nursery, fake: FakeMilter) -> dict[str, str]:
    port = await nursery.start(fake.serve)
    return {"address": f"127.0.0.1:{port}", "timeout": "2s"}


@pytest.mark.parametrize(
    ("command", "reply", "at", "expected"),
    [
        (b"M", b"r", 0, (550, b"5.7.1")),
        (b"M", b"t", 0, (451, b"4.7.1")),
        (b"R", b"r", 1, (550, b"5.7.1")),
        (b"R", b"y554 5.7.0 not this one\0", 1, (554, b"5.7.0 not this one")),
        (b"E", b"r", 2, (550, b"5.7.1")),
        (b"E", b"t", 2, (451, b"4.7.1")),
        (b"E", b"y421 4.7.0 go away later\0", 2, (421, b"4.7.0 go away later")),
        (b"C", b"r", 0, (550, b"5.7.1")),
        (b"H", b"t", 0, (451, b"4.7.1")),
    ],
)
async def test_milter_refusals_become_the_smtp_reply(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    command: bytes,
    reply: bytes,
    at: int,
    expected: tuple[int, bytes],
) -> None:
    milter = await _milter(nursery, FakeMilter(replies={command: reply}))
    mta = await _start(nursery, make_config, milter)
    replies = await _run(lambda: _send(mta.address("smtp")[1]))
    assert replies[at][0] == expected[0]
    assert replies[at][1].startswith(expected[1])
    await trio.sleep(0.3)
    assert new_files(mta.config.local.maildir_root, "bob") == []


async def test_milter_discard_acknowledges_and_drops(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    milter = await _milter(nursery, FakeMilter(replies={b"E": b"d"}))
    mta = await _start(nursery, make_config, milter)
    replies = await _run(lambda: _send(mta.address("smtp")[1]))
    assert replies[-1][0] == 250
    await trio.sleep(0.5)
    assert new_files(mta.config.local.maildir_root, "bob") == []


async def test_milter_accept_and_continue_let_mail_through_with_what_it_saw(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    fake = FakeMilter(replies={b"E": b"a"})
    mta = await _start(nursery, make_config, await _milter(nursery, fake))
    replies = await _run(lambda: _send(mta.address("smtp")[1]))
    assert replies[-1][0] == 250
    [path] = await wait_for_mail(mta.config.local.maildir_root, "bob")
    assert path.read_bytes().endswith(MESSAGE.replace(b"\r\n", b"\n"))  # Maildir: LF
    commands = [c for c, _ in fake.received]
    for c in (b"O", b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B", b"E"):
        assert c in commands
    body = b"".join(d for c, d in fake.received if c == b"B")
    assert body == b"body text\r\n"
    assert (b"Subject", b"hello") in fake.headers()
    assert fake.headers()[0][0] == b"Received"  # our trace header is part of the message
    macros = b"".join(d for c, d in fake.received if c == b"D")
    for name in (
        b"j\0",
        b"{client_addr}\x00127.0.0.1\x00",
        b"{rcpt_addr}\0bob@example.test\0",
        b"{mail_addr}\0s@remote.test\0",
        b"i\0",
        b"{daemon_name}\0",
    ):
        assert name in macros
    [connect] = [d for c, d in fake.received if c == b"C"]
    assert connect.startswith(b"unknown\x004") and connect.endswith(b"127.0.0.1\0")


async def test_milter_modifications_are_applied_before_delivery(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    mods = [
        pkt(b"h", b"X-Added\0yes\0"),
        pkt(b"i", struct.pack(">I", 0) + b"X-First\0top\0"),
        pkt(b"m", struct.pack(">I", 2) + b"X-Old\0changed\0"),
        pkt(b"m", struct.pack(">I", 1) + b"Subject\0\0"),
        pkt(b"e", b"<new@remote.test>\0"),
        pkt(b"+", b"<alice@example.test>\0"),
        pkt(b"-", b"<bob@example.test>\0"),
        pkt(b"b", b"new body\r\n"),
    ]
    fake = FakeMilter(eom_mods=mods)
    mta = await _start(nursery, make_config, await _milter(nursery, fake))
    replies = await _run(lambda: _send(mta.address("smtp")[1]))
    assert replies[-1][0] == 250
    root: Path = mta.config.local.maildir_root
    [path] = await wait_for_mail(root, "alice")
    data = path.read_bytes()
    msg = email.message_from_bytes(data)
    assert b"Delivered-To: alice@example.test\nX-First: top\nReceived: " in data
    assert msg["X-Added"] == "yes"
    assert msg.get_all("X-Old") == ["one", "changed"]
    assert msg["Subject"] is None
    assert msg.get_payload() == "new body\n"
    assert msg["Return-Path"] in (None, "<new@remote.test>")
    await trio.sleep(0.3)
    assert new_files(root, "bob") == []


async def test_milters_run_in_order_and_the_second_sees_the_first_ones_changes(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    first = FakeMilter(eom_mods=[pkt(b"h", b"X-First\x001\x00")])
    second = FakeMilter(replies={b"R": b"c"})
    mta = await _start(
        nursery, make_config, await _milter(nursery, first), await _milter(nursery, second)
    )
    assert (await _run(lambda: _send(mta.address("smtp")[1])))[-1][0] == 250
    [path] = await wait_for_mail(mta.config.local.maildir_root, "bob")
    assert b"X-First: 1\n" in path.read_bytes()
    assert (b"X-First", b"1") in second.headers()


async def test_milter_down_with_on_error_tempfail_answers_451_at_mail(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mta = await _start(
        nursery, make_config, {"address": f"127.0.0.1:{port}", "on_error": "tempfail"}
    )
    replies = await _run(lambda: _send(mta.address("smtp")[1]))
    assert replies[0][0] == 451 and replies[0][1].startswith(b"4.7.1")


async def test_milter_down_with_on_error_accept_lets_mail_flow(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mta = await _start(nursery, make_config, {"address": f"127.0.0.1:{port}", "on_error": "accept"})
    assert (await _run(lambda: _send(mta.address("smtp")[1])))[-1][0] == 250
    await wait_for_mail(mta.config.local.maildir_root, "bob")


@pytest.mark.parametrize(("on_error", "code"), [("tempfail", 451), ("accept", 250)])
async def test_milter_that_stops_answering_times_out_into_on_error(
    nursery: trio.Nursery, make_config: Callable[..., Config], on_error: str, code: int
) -> None:
    fake = FakeMilter(silent={b"E"})
    port = await nursery.start(fake.serve)
    mta = await _start(
        nursery,
        make_config,
        {"address": f"127.0.0.1:{port}", "timeout": "0.5s", "on_error": on_error},
    )
    start = trio.current_time()
    replies = await _run(lambda: _send(mta.address("smtp")[1]))
    assert replies[-1][0] == code
    assert trio.current_time() - start < 5


async def test_milter_sending_garbage_is_an_error_not_a_crash(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    fake = FakeMilter(replies={b"M": b"Z"})  # no such reply
    mta = await _start(nursery, make_config, await _milter(nursery, fake))
    replies = await _run(lambda: _send(mta.address("smtp")[1]))
    assert replies[0][0] == 451


async def test_large_spooled_body_is_streamed_in_chunks_and_rewritten(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    fake = FakeMilter(eom_mods=[pkt(b"h", b"X-Seen\0big\0")])
    mta = await _start(nursery, make_config, await _milter(nursery, fake))
    body = b"".join([b"line %06d\r\n" % i for i in range(30000)])
    data = b"From: s@remote.test\r\nSubject: big\r\n\r\n" + body
    assert (await _run(lambda: _send(mta.address("smtp")[1], data=data)))[-1][0] == 250
    chunks = [d for c, d in fake.received if c == b"B"]
    assert len(chunks) > 1 and all(len(c) <= 65535 for c in chunks)
    assert b"".join(chunks) == body
    [path] = await wait_for_mail(mta.config.local.maildir_root, "bob")
    got = path.read_bytes()
    assert b"X-Seen: big\n" in got and got.endswith(body.replace(b"\r\n", b"\n"))


@pytest.mark.parametrize(
    ("milter", "message"),
    [
        (
            {"address": "127.0.0.1:11332", "on_error": "ignore"},
            "[[milter]][1].on_error: must be one of tempfail, accept",
        ),
        ({"address": "unix:relative.sock"}, '[[milter]][1].address: must be "unix:/absolute/path"'),
        ({"timeout": "5s"}, "[[milter]][1].address: missing"),
        ({"address": "127.0.0.1:11332", "timeout": "soon"}, "[[milter]][1].timeout:"),
        (
            {"address": "127.0.0.1:11332", "reuse_connections": "yes"},
            "[[milter]][1].reuse_connections:",
        ),
    ],
)
def test_milter_config_errors_name_the_key(
    make_config: Callable[..., Config], milter: dict[str, object], message: str
) -> None:
    with pytest.raises(trio_mta.config.ConfigError) as info:
        make_config(milter=[milter])
    assert message in str(info.value)
