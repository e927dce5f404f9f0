"""Inbound SMTP end to end: real sockets, real clients, real Maildirs."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from trio_mta.config import Config
from trio_mta.mta import MTA, serve

from .maildirs import new_files, tmp_files, wait_for_mail
from .rawsmtp import RawClient

MESSAGE = (
    b"Subject: hello\r\nFrom: a@remote.test\r\nTo: bob@example.test\r\n\r\nHi Bob.\r\n.dot line\r\n"
)


def smtplib_send(port: int, sender: str, rcpts: list[str], msg: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.remote.test")
        code, text = client.mail(sender)
        assert code == 250, text
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            assert code == 250, (rcpt, text)
        code, text = client.data(msg)
        assert code == 250, text
        return text.decode()


async def start(nursery: trio.Nursery, config: Config) -> MTA:
    server: MTA = await nursery.start(serve, config)
    return server


async def test_smtplib_delivers_into_maildir(mta: MTA) -> None:
    _, port = mta.address("smtp")
    text = await trio.to_thread.run_sync(
        smtplib_send, port, "alice@remote.test", ["Bob@Example.TEST"], MESSAGE
    )
    assert text.startswith("2.0.0 Ok: queued as ")
    queue_id = text.rsplit(" ", 1)[1]
    root = mta.config.local.maildir_root
    [path] = await wait_for_mail(root, "bob")
    content = path.read_bytes()
    first, second, _ = content.split(b"\n", 2)
    assert first == b"Return-Path: <alice@remote.test>"
    assert second.lower() == b"delivered-to: bob@example.test"
    assert b"\r\n" not in content, "Maildir files hold LF line ends"
    assert b"\nReceived: from client.remote.test ([127.0.0.1])\n" in content
    assert f" id {queue_id}".encode() in content
    assert b"\nHi Bob.\n.dot line\n" in content  # dot-stuffing undone
    assert tmp_files(root) == []
    name = path.name
    assert ".M" in name and "P" in name and "Q" in name, name


async def test_pipelined_transaction_replies_in_order(mta: MTA) -> None:
    client = await RawClient.connect(*mta.address("smtp"))
    assert (await client.reply()).startswith(b"220 ")
    await client.send(
        b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@example.test>\r\n"
        b"RCPT TO:<y@example.test>\r\nRCPT TO:<z@elsewhere.test>\r\nDATA\r\n"
    )
    ehlo = await client.reply()
    assert b"PIPELINING" in ehlo and b"STARTTLS" in ehlo
    assert b"AUTH" not in ehlo, "AUTH is only offered over TLS"
    assert (await client.reply()).startswith(b"250 2.1.0")
    assert (await client.reply()).startswith(b"250 2.1.5")
    assert (await client.reply()).startswith(b"250 2.1.5")
    # 127.0.0.0/8 is trusted by default (SPEC §3), so relaying is allowed.
    assert (await client.reply()).startswith(b"250 2.1.5")
    assert (await client.reply()).startswith(b"354")
    await client.send(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert (await client.reply()).startswith(b"250 2.0.0 Ok: queued as ")
    assert (await client.reply()).startswith(b"221")
    root = mta.config.local.maildir_root
    await wait_for_mail(root, "x")
    await wait_for_mail(root, "y")


async def test_relay_denied_for_untrusted(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    server = await start(nursery, make_config(relay={"trusted_networks": []}))
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"MAIL FROM:<a@remote.test>")
    reply = await client.command(b"RCPT TO:<victim@elsewhere.test>")
    assert reply.startswith(b"554 5.7.1"), reply
    reply = await client.command(b"RCPT TO:<bob@example.test>")
    assert reply.startswith(b"250 2.1.5"), reply


async def test_unknown_user_with_mailbox_map(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    server = await start(
        nursery,
        make_config(
            local={
                "mailboxes": {"alice@example.test": "alice"},
                "aliases": {
                    "postmaster@example.test": ["alice@example.test"],
                    "team@example.test": ["alice@example.test", "team@example.test"],
                },
            }
        ),
    )
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"MAIL FROM:<a@remote.test>")
    assert (await client.command(b"RCPT TO:<nobody@example.test>")).startswith(b"550 5.1.1")
    assert (await client.command(b"RCPT TO:<ALICE@example.test>")).startswith(b"250")
    assert (await client.command(b"RCPT TO:<postmaster@example.test>")).startswith(b"250")
    assert (await client.command(b"RCPT TO:<team@example.test>")).startswith(b"250")
    assert (await client.command(b"DATA")).startswith(b"354")
    assert (await client.command(b"Subject: x\r\n\r\nhi\r\n.")).startswith(b"250 2.0.0")
    root = server.config.local.maildir_root
    await wait_for_mail(root, "alice")
    await trio.sleep(0.3)
    # three RCPTs resolve to one mailbox: exactly one copy (SPEC §5)
    assert len(new_files(root, "alice")) == 1


@pytest.mark.parametrize(
    "local_part",
    [
        b'"../../escape"',
        b'"a/b"',
        b'"%2e%2e"',
        b'".."',
        b'"."',
        b'".hidden"',
        b'"x\\\\y"',
    ],
)
async def test_path_traversal_refused(mta: MTA, local_part: bytes, tmp_path: Path) -> None:
    client = await RawClient.connect(*mta.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"MAIL FROM:<a@remote.test>")
    reply = await client.command(b"RCPT TO:<" + local_part + b"@example.test>")
    assert reply[:1] == b"5", reply
    root = mta.config.local.maildir_root
    assert not (tmp_path / "escape").exists()
    assert not root.exists() or all(p.parent == root for p in root.iterdir())


@pytest.mark.parametrize(
    "smuggle",
    [
        b"\n.\r\n",
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\n.\r",
    ],
)
async def test_smuggling_never_ends_data(mta: MTA, smuggle: bytes) -> None:
    client = await RawClient.connect(*mta.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"MAIL FROM:<a@remote.test>")
    await client.command(b"RCPT TO:<bob@example.test>")
    assert (await client.command(b"DATA")).startswith(b"354")
    await client.send(
        b"Subject: one\r\n\r\nfirst"
        + smuggle
        + b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<victim@example.test>\r\n"
        b"DATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
    )
    reply = await client.reply()
    assert reply.startswith(b"550 5.5.2"), reply
    # The smuggled commands were data, not commands: the next reply is for NOOP.
    assert (await client.command(b"NOOP")).startswith(b"250")
    await trio.sleep(0.3)
    root = mta.config.local.maildir_root
    assert new_files(root, "victim") == [] and new_files(root, "bob") == []


async def test_bare_lf_command_line(mta: MTA) -> None:
    client = await RawClient.connect(*mta.address("smtp"))
    await client.reply()
    await client.send(b"NOOP\nNOOP\r\n")
    assert (await client.reply()).startswith(b"500 5.5.2")
    assert (await client.reply()).startswith(b"250")


async def test_limits(nursery: trio.Nursery, make_config: Callable[..., Config]) -> None:
    server = await start(
        nursery, make_config(limits={"max_recipients": 2, "max_message_size": 2000})
    )
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    ehlo = await client.command(b"EHLO c.test")
    assert b"SIZE 2000" in ehlo
    assert (await client.command(b"MAIL FROM:<a@remote.test> SIZE=5000")).startswith(b"552 5.3.4")
    assert (await client.command(b"MAIL FROM:<a@remote.test> SIZE=100")).startswith(b"250")
    assert (await client.command(b"RCPT TO:<a@example.test>")).startswith(b"250")
    assert (await client.command(b"RCPT TO:<b@example.test>")).startswith(b"250")
    assert (await client.command(b"RCPT TO:<c@example.test>")).startswith(b"452 4.5.3")
    assert (await client.command(b"DATA")).startswith(b"354")
    await client.send(
        b"Subject: big\r\n\r\n"
        + b"x" * 990
        + b"\r\n"
        + b"y" * 990
        + b"\r\n"
        + b"z" * 100
        + b"\r\n.\r\n"
    )
    assert (await client.reply()).startswith(b"552 5.3.4")
    assert (await client.command(b"X" * 600)).startswith(b"500 5.5.2")
    assert (await client.command(b"NOOP")).startswith(b"250")


async def test_text_lines_of_998_octets_are_accepted(mta: MTA) -> None:
    client = await RawClient.connect(*mta.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"MAIL FROM:<a@remote.test>")
    await client.command(b"RCPT TO:<long@example.test>")
    await client.command(b"DATA")
    line = b"L" * 998
    assert (await client.command(b"Subject: l\r\n\r\n" + line + b"\r\n.")).startswith(b"250")
    [path] = await wait_for_mail(mta.config.local.maildir_root, "long")
    assert b"\n" + line + b"\n" in path.read_bytes()


async def test_command_timeout(nursery: trio.Nursery, make_config: Callable[..., Config]) -> None:
    server = await start(nursery, make_config(limits={"command_timeout": 0.5}))
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    assert (await client.reply(timeout=5)).startswith(b"421 4.4.2")
    assert await client.eof()


async def test_data_timeout(nursery: trio.Nursery, make_config: Callable[..., Config]) -> None:
    server = await start(nursery, make_config(limits={"data_timeout": 0.5}))
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"MAIL FROM:<a@remote.test>")
    await client.command(b"RCPT TO:<slow@example.test>")
    await client.command(b"DATA")
    await client.send(b"Subject: partial\r\n")
    assert (await client.reply(timeout=5)).startswith(b"421 4.4.2")
    await trio.sleep(0.3)
    assert new_files(server.config.local.maildir_root, "slow") == []


async def test_connection_limits(nursery: trio.Nursery, make_config: Callable[..., Config]) -> None:
    server = await start(
        nursery, make_config(limits={"max_connections": 3, "max_connections_per_ip": 2})
    )
    addr = server.address("smtp")
    first = await RawClient.connect(*addr)
    second = await RawClient.connect(*addr)
    assert (await first.reply()).startswith(b"220")
    assert (await second.reply()).startswith(b"220")
    third = await RawClient.connect(*addr)
    assert (await third.reply()).startswith(b"421 4.7.0")
    assert await third.eof()
    await first.command(b"QUIT")
    await first.aclose()
    await trio.sleep(0.1)
    fourth = await RawClient.connect(*addr)
    assert (await fourth.reply()).startswith(b"220")


async def test_client_vanishing_mid_data_leaves_nothing(mta: MTA) -> None:
    client = await RawClient.connect(*mta.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"MAIL FROM:<a@remote.test>")
    await client.command(b"RCPT TO:<gone@example.test>")
    await client.command(b"DATA")
    await client.send(b"Subject: half a message\r\n\r\nsome text\r\n")
    await client.aclose()
    await trio.sleep(0.5)
    assert new_files(mta.config.local.maildir_root, "gone") == []
    rows = await trio.to_thread.run_sync(mta.store.list_messages)
    assert rows == []


async def test_vrfy_help_and_unknown_commands(mta: MTA) -> None:
    client = await RawClient.connect(*mta.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    assert (await client.command(b"VRFY bob")).startswith(b"252")
    assert (await client.command(b"HELP")).startswith(b"214")
    assert (await client.command(b"FROB")).startswith(b"500 5.5.1")
    assert (await client.command(b"DATA")).startswith(b"503 5.5.1")
    assert (await client.command(b"QUIT")).startswith(b"221")


async def test_graceful_stop_lets_a_transaction_finish(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    server = await start(nursery, make_config())
    idle = await RawClient.connect(*server.address("smtp"))
    busy = await RawClient.connect(*server.address("smtp"))
    for client in (idle, busy):
        await client.reply()
        await client.command(b"EHLO c.test")
    await busy.command(b"MAIL FROM:<a@remote.test>")
    await busy.command(b"RCPT TO:<late@example.test>")
    assert (await busy.command(b"DATA")).startswith(b"354")
    server.stop()
    # The idle session is told at once; new connections are no longer accepted.
    assert (await idle.reply()).startswith(b"421 4.3.2")
    assert await idle.eof()
    with pytest.raises(OSError):
        await RawClient.connect(*server.address("smtp"))
    # The session in the middle of a message may still finish it.
    assert (await busy.command(b"Subject: late\r\n\r\nstill here\r\n.")).startswith(b"250 2.0.0")
    assert (await busy.reply()).startswith(b"421 4.3.2")
