"""Client-supplied control characters never reach logs or headers raw.

C0/C1 controls, DEL and the Unicode line separators are escaped in both log
formats; addresses, EHLO names and AUTH user names holding them are refused
with a reply that says why, so they cannot reach Return-Path: or Received:.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from trio_mta import log
from trio_mta.config import Config
from trio_mta.mta import MTA, serve
from trio_mta.server.passwords import PasswordFile

from .conftest import HOSTNAME
from .rawsmtp import RawClient

EVIL = "ev\0il\x1b[31mRED\x85\u2028x"


def _record(**fields: object) -> logging.LogRecord:
    record = logging.LogRecord(
        log.LOGGER_NAME, logging.WARNING, __file__, 1, "smtpd.auth", None, None
    )
    record.trio_mta_fields = fields
    return record


def test_text_log_escapes_controls_and_line_separators() -> None:
    line = log.TextFormatter().format(_record(user=EVIL, plain="bob", quote='a "b" \\'))
    assert line.splitlines() == [line]
    assert line.isprintable(), repr(line)
    assert ' user="ev\\x00il\\x1b[31mRED\\x85\\u2028x" ' in line
    assert " plain=bob " in line
    assert line.endswith(' quote="a \\"b\\" \\\\"')


def test_json_log_escapes_controls_and_line_separators() -> None:
    line = log.JsonFormatter().format(_record(user=EVIL, lone="a\udcffb"))
    assert line.splitlines() == [line]
    assert line.isprintable() and line.encode("utf-8"), repr(line)
    assert json.loads(line)["user"] == EVIL


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    """What the server's text log would hold, through the real formatter."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(log.TextFormatter())
    logger = logging.getLogger(log.LOGGER_NAME)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
async def server(nursery: trio.Nursery, make_config: Callable[..., Config]) -> MTA:
    config = make_config()
    PasswordFile(config.auth.users_file).set_password("alice", "secret")
    mta: MTA = await nursery.start(serve, config)
    mta.state.auth_failure_delay = 0.01
    return mta


async def test_auth_user_with_controls_is_refused_and_logged_escaped(
    server: MTA, tls_files: tuple[Path, Path, Path], text_log: io.StringIO
) -> None:
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    await client.command(b"STARTTLS")
    await client.starttls(ssl.create_default_context(cafile=str(tls_files[2])), HOSTNAME)
    await client.command(b"EHLO c.test")
    assert (await client.command(b"AUTH LOGIN")).startswith(b"334 ")
    assert (await client.command(base64.b64encode(EVIL.encode()))).startswith(b"334 ")
    reply = await client.command(base64.b64encode(b"secret"))
    assert reply.startswith(b"535 5.7.8 ") and b"U+0000 not allowed in a user name" in reply
    logged = text_log.getvalue()
    assert "\0" not in logged and "\x1b" not in logged and "\x85" not in logged
    assert "\u2028" not in logged
    assert 'user="ev\\x00il\\x1b[31mRED\\x85\\u2028x"' in logged


@pytest.mark.parametrize(
    "path",
    [
        '"a\u0085b"@remote.test',
        '"a\u2028b"@remote.test',
        "a\u0085b@remote.test",
        "a@re\u2029mote.test",
    ],
)
async def test_sender_with_control_characters_is_refused(server: MTA, path: str) -> None:
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    reply = await client.command(f"MAIL FROM:<{path}> SMTPUTF8".encode())
    assert reply.startswith(b"501 5.1.7 Bad sender address syntax: U+"), reply
    assert b"not allowed in an address" in reply


@pytest.mark.parametrize(
    "path", ['"x\u0085y"@example.test', '"x\u2028y"@example.test', "x\u009by@elsewhere.test"]
)
async def test_recipient_with_control_characters_is_refused(server: MTA, path: str) -> None:
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    assert (await client.command(b"MAIL FROM:<a@remote.test> SMTPUTF8")).startswith(b"250")
    reply = await client.command(f"RCPT TO:<{path}>".encode())
    assert reply.startswith(b"553 5.1.3 Bad recipient address syntax: U+"), reply
    # The transaction goes on; a clean recipient is still fine.
    assert (await client.command("RCPT TO:<jörg@example.test>".encode())).startswith(b"250")


async def test_ehlo_name_with_control_characters_is_refused(server: MTA) -> None:
    client = await RawClient.connect(*server.address("smtp"))
    await client.reply()
    await client.command(b"EHLO c.test")
    # Inside an SMTPUTF8 transaction a non-ASCII EHLO name is parsed at all.
    assert (await client.command(b"MAIL FROM:<a@remote.test> SMTPUTF8")).startswith(b"250")
    reply = await client.command("EHLO ev\u0085il".encode())
    assert reply.startswith(b"501 5.5.2 Control character in EHLO hostname"), reply
