"""``trio-mta sendmail`` as cron, git and PHP call it: a real process against a real server.

The server runs in-process on 127.0.0.1 port 0; the command is a subprocess
given a config file that names the port the server bound, so it takes the
same path as on a production host (config -> smtp listener -> loopback SMTP
-> durable queue -> Maildir).
"""

from __future__ import annotations

import email
import email.policy
import io
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_mta.cli.sendmail import (
    EX_CONFIG,
    EX_DATAERR,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    SendmailError,
    parse_args,
    prepare_message,
    run_sendmail,
    submission_target,
)
from trio_mta.config import Config
from trio_mta.mta import MTA, serve

from .conftest import HOSTNAME
from .maildirs import new_files, wait_for_mail

DOMAIN = "example.test"
LOGIN = "cronuser"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@dataclass
class Site:
    """A running server and a config file that points the command at it."""

    mta: MTA
    config_file: Path
    maildir: Path

    async def sendmail(self, *args: str, stdin: bytes = b"") -> Result:
        return await sendmail(self.config_file, *args, stdin=stdin)

    async def sendmail_process(
        self, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None, config: bool = True
    ) -> Result:
        return await sendmail_process(
            self.config_file if config else None, *args, stdin=stdin, env=env
        )

    async def mail(self, mailbox: str, count: int = 1) -> list[EmailMessage]:
        files = await wait_for_mail(self.maildir, mailbox, count)
        return [_parse(path.read_bytes()) for path in files]


async def sendmail(config_file: Path, *args: str, stdin: bytes = b"") -> Result:
    """The command in a worker thread (it runs its own trio loop): fast, same code path
    from its argument list on; the cli hook itself is covered by :func:`sendmail_process`."""

    def call() -> Result:
        err = io.StringIO()
        code = run_sendmail(
            list(args), config_path=str(config_file), stdin=io.BytesIO(stdin), stderr=err
        )
        return Result(code, "", err.getvalue())

    return await trio.to_thread.run_sync(call)


async def sendmail_process(
    config_file: Path | None, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> Result:
    """``python -m trio_mta [--config FILE] sendmail ARGS`` with ``stdin``; never a traceback."""
    argv = [sys.executable, "-m", "trio_mta"]
    argv += ["--config", str(config_file), "sendmail"] if config_file else ["sendmail"]
    environment = {k: v for k, v in os.environ.items() if k != "TRIO_MTA_CONFIG"}
    environment |= {"LOGNAME": LOGIN, **(env or {})}
    done = await trio.run_process(
        [*argv, *args],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=environment,
    )
    result = Result(done.returncode, done.stdout.decode(), done.stderr.decode())
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def write_client_config(tmp_path: Path, port: int, **extra: str) -> Path:
    """What an admin's /etc/trio-mta.toml says, minus the parts sendmail never reads."""
    path = tmp_path / "sendmail.toml"
    lines = [
        f'hostname = "{HOSTNAME}"',
        "[[listen]]",
        'address = "127.0.0.1:1"',
        'mode = "submission"',
        "[[listen]]",
        f'address = "127.0.0.1:{port}"',
        'mode = "smtp"',
        "[local]",
        f'domains = ["{DOMAIN}"]',
    ]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True)
def login(monkeypatch: pytest.MonkeyPatch) -> None:
    """getpass.getuser() reads LOGNAME first: a fixed login for the default sender."""
    monkeypatch.setenv("LOGNAME", LOGIN)
    monkeypatch.delenv("TRIO_MTA_CONFIG", raising=False)


@pytest.fixture
def start_site(
    nursery: trio.Nursery, tmp_path: Path, make_config: Callable[..., Config]
) -> Callable[..., Any]:
    async def start(**sections: Any) -> Site:
        config = make_config(listen=[{"address": "127.0.0.1:0", "mode": "smtp"}], **sections)
        mta: MTA = await nursery.start(serve, config)
        return Site(
            mta, write_client_config(tmp_path, mta.address("smtp")[1]), config.local.maildir_root
        )

    return start


@pytest.fixture
async def site(start_site: Callable[..., Any]) -> AsyncIterator[Site]:
    yield await start_site()


# --- delivery ------------------------------------------------------------------------


async def test_plain_recipients_reach_their_maildirs(site: Site) -> None:
    result = await site.sendmail_process(
        "alice@example.test", "bob", stdin=b"Subject: cron output\n\nall good\n"
    )
    assert (result.code, result.stdout, result.stderr) == (EX_OK, "", "")
    alice = (await site.mail("alice"))[0]
    bob = (await site.mail("bob"))[0]  # unqualified: a user of the first local domain
    for message in (alice, bob):
        assert message["Subject"] == "cron output"
        assert message["Return-Path"] == f"<{LOGIN}@{HOSTNAME}>"
        assert message["From"] == f"{LOGIN}@{HOSTNAME}"  # added: the message had none
        # trusted loopback client: the server completes the message (RFC 6409 §8)
        assert message["Date"] and message["Message-ID"]
        assert message.get_content() == "all good\n"
    assert bob["Delivered-To"] == "bob@example.test"


async def test_t_takes_to_cc_bcc_and_strips_bcc(site: Site) -> None:
    message = (
        b"From: Reporter <reporter@example.test>\r\n"
        b"To: Alice <alice@example.test>,\r\n\tbob@example.test\r\n"
        b"Cc: carol@example.test\r\n"
        b"Bcc: dave@example.test, erin@example.test\r\n"
        b"Subject: weekly\r\n\r\nnumbers\r\n"
    )
    result = await site.sendmail("-t", "-i", "frank@example.test", stdin=message)
    assert result.code == EX_OK, result.stderr
    for mailbox in ("alice", "bob", "carol", "dave", "erin", "frank"):
        (copy,) = await site.mail(mailbox)
        assert copy["Bcc"] is None
        header = new_files(site.maildir, mailbox)[0].read_bytes().split(b"\n\n")[0]
        seen = b"\n".join(
            line for line in header.split(b"\n") if not line.startswith(b"Delivered-To:")
        )
        assert b"dave@" not in seen and b"erin@" not in seen  # no trace of who else got it
        assert copy["To"] == "Alice <alice@example.test>, bob@example.test"
        assert copy["Cc"] == "carol@example.test"
        assert copy["From"] == "Reporter <reporter@example.test>"  # kept, not replaced


async def test_f_sets_return_path_and_F_the_from_name(site: Site) -> None:
    result = await site.sendmail(
        "-f", "robot@example.test", "-FBuild Robot", "alice", stdin=b"Subject: built\n\nok\n"
    )
    assert result.code == EX_OK, result.stderr
    (message,) = await site.mail("alice")
    assert message["Return-Path"] == "<robot@example.test>"
    assert message["From"] == "Build Robot <robot@example.test>"

    # -r is the old spelling; -F never overrides a From: the message has
    result = await site.sendmail(
        "-r<ops@example.test>", "-F", "Ignored", "bob", stdin=b"From: me@example.test\n\nx\n"
    )
    assert result.code == EX_OK, result.stderr
    (message,) = await site.mail("bob")
    assert message["Return-Path"] == "<ops@example.test>"
    assert message["From"] == "me@example.test"


async def test_lone_dot_ends_input_unless_i(site: Site) -> None:
    text = b"Subject: dots\n\nbefore\n.\nafter\n..two\n"
    assert (await site.sendmail("alice", stdin=text)).code == EX_OK
    (message,) = await site.mail("alice")
    assert message.get_content() == "before\n"

    for flag in ("-i", "-oi"):
        assert (await site.sendmail(flag, "bob", stdin=text.replace(b"\n", b"\r\n"))).code == 0
    for message in await site.mail("bob", 2):
        # the dot line and the leading dots survive SMTP's dot-stuffing both ways
        assert message.get_content() == "before\n.\nafter\n..two\n"


async def test_too_many_recipients_go_in_a_second_transaction(
    start_site: Callable[..., Any],
) -> None:
    site = await start_site(limits={"max_recipients": 2})
    result = await site.sendmail("a1", "a2", "a3", "a4", "a5", stdin=b"Subject: many\n\nx\n")
    assert result.code == EX_OK, result.stderr  # RFC 5321 §4.5.3.1.10: 452 -> retry the rest
    for mailbox in ("a1", "a2", "a3", "a4", "a5"):
        assert len(await site.mail(mailbox)) == 1


# --- failures ------------------------------------------------------------------------


async def test_rejected_recipients_exit_69_with_the_servers_text(
    start_site: Callable[..., Any],
) -> None:
    site = await start_site(local={"mailboxes": {"alice@example.test": "alice"}})
    result = await site.sendmail("nobody@example.test", stdin=b"Subject: x\n\ny\n")
    assert result.code == EX_UNAVAILABLE
    assert "nobody@example.test: 550 5.1.1" in result.stderr

    # one good, one bad: the good one is queued, the exit status still says it failed
    result = await site.sendmail("alice", "ghost", stdin=b"Subject: half\n\ny\n")
    assert result.code == EX_UNAVAILABLE
    assert "ghost@example.test: 550 5.1.1" in result.stderr
    assert "alice" not in result.stderr.split("queued")[0]
    assert "queued for the other 1 recipient" in result.stderr
    (message,) = await site.mail("alice")
    assert message["Subject"] == "half"


async def test_server_stopped_is_tempfail(
    nursery: trio.Nursery, tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    config = make_config(listen=[{"address": "127.0.0.1:0", "mode": "smtp"}])
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[MTA]) -> None:
        await serve(config, task_status=task_status)
        stopped.set()

    mta: MTA = await nursery.start(run)
    site = Site(
        mta, write_client_config(tmp_path, mta.address("smtp")[1]), config.local.maildir_root
    )
    mta.stop()
    await stopped.wait()
    result = await site.sendmail_process("alice", stdin=b"Subject: lost?\n\nno\n")
    assert result.code == EX_TEMPFAIL
    assert "is it running?" in result.stderr and "127.0.0.1" in result.stderr


async def test_usage_errors_exit_64(site: Site) -> None:
    no_rcpt = await site.sendmail(stdin=b"Subject: x\n\ny\n")
    assert no_rcpt.code == EX_USAGE and "no recipients" in no_rcpt.stderr
    none_in_headers = await site.sendmail("-t", stdin=b"Subject: x\n\ny\n")
    assert none_in_headers.code == EX_USAGE and "no recipients" in none_in_headers.stderr
    unknown = await site.sendmail_process("-q", "alice", stdin=b"x\n")
    assert unknown.code == EX_USAGE and "-q" in unknown.stderr
    assert len(unknown.stderr.splitlines()) == 1
    mode = await site.sendmail("-bs", stdin=b"")
    assert mode.code == EX_USAGE and "-bs" in mode.stderr
    bad_sender = await site.sendmail("-f", "a b@@", "alice", stdin=b"x\n")
    assert bad_sender.code == EX_USAGE
    assert new_files(site.maildir, "alice") == []


async def test_config_after_subcommand_and_from_environment(site: Site) -> None:
    after = await site.sendmail_process(
        "alice", "--config", str(site.config_file), stdin=b"Subject: one\n\n1\n", config=False
    )
    env = await site.sendmail_process(
        "alice",
        stdin=b"Subject: two\n\n2\n",
        config=False,
        env={"TRIO_MTA_CONFIG": str(site.config_file)},
    )
    assert (after.code, env.code) == (EX_OK, EX_OK), after.stderr + env.stderr
    subjects = sorted(str(m["Subject"]) for m in await site.mail("alice", 2))
    assert subjects == ["one", "two"]


async def test_nul_bytes_are_a_data_error(site: Site) -> None:
    result = await site.sendmail("alice", stdin=b"Subject: x\n\nnul\0here\n")
    assert result.code == EX_DATAERR and "NUL" in result.stderr
    bad_header = await site.sendmail("-t", stdin=b"To: a b@@\n\nx\n")
    assert bad_header.code == EX_DATAERR and "To: header" in bad_header.stderr


@pytest.mark.parametrize(
    ("listen", "why"),
    [
        ([("127.0.0.1:2587", "submission"), ("127.0.0.1:2465", "smtps")], 'mode "smtp"'),
        ([("127.0.0.1:0", "smtp")], "port 0"),
    ],
)
async def test_config_without_a_usable_listener_exits_78(
    tmp_path: Path, listen: list[tuple[str, str]], why: str
) -> None:
    path = tmp_path / "mta.toml"
    path.write_text("".join(f'[[listen]]\naddress = "{a}"\nmode = "{m}"\n' for a, m in listen))
    result = await sendmail(path, "alice", stdin=b"x\n")
    assert result.code == EX_CONFIG and why in result.stderr


async def test_untrusted_loopback_and_broken_config_exit_78(tmp_path: Path) -> None:
    path = write_client_config(tmp_path, 2525)
    with path.open("a") as file:
        file.write('[relay]\ntrusted_networks = ["192.0.2.0/24"]\n')
    untrusted = await sendmail(path, "alice", stdin=b"x\n")
    assert untrusted.code == EX_CONFIG and "trusted_networks" in untrusted.stderr
    path.write_text("[limits]\nmax_recipients = 'many'\n")
    broken = await sendmail(path, "alice", stdin=b"x\n")
    assert broken.code == EX_CONFIG and "max_recipients" in broken.stderr


# --- flags and header editing, in-process --------------------------------------------


def test_flags_parse_the_way_sendmails_getopt_does() -> None:
    options = parse_args(
        [
            "-ti",
            "-fbot@example.test",
            "-odb",
            "-oem",
            "-B8BITMIME",
            "-bm",
            "-F",
            "--config",
            "alice",
            "--config=x.toml",
            "--",
            "-bob",
        ]
    )
    assert options.extract and options.ignore_dots
    assert options.sender == "bot@example.test"
    assert options.full_name == "--config"  # a value, not the long option
    assert options.config_path == "x.toml"
    assert options.recipients == ["alice", "-bob"]
    assert not parse_args(["-om", "alice"]).ignore_dots
    assert parse_args(["-o", "i", "alice"]).ignore_dots
    with pytest.raises(SendmailError) as info:
        parse_args(["-x"])
    assert info.value.code == EX_USAGE


def test_prepare_message_edits_only_what_it_must() -> None:
    raw = (
        b"To: a@example.test,\n b@example.test\nBcc: hidden@example.test\n"
        b"Cc: undisclosed-recipients:;\nX-Keep: \xc3\xa9t\xc3\xa9\n\nBcc: in the body\n"
    )
    data, found = prepare_message(
        raw, sender="s@example.test", hostname=HOSTNAME, full_name=None, extract=True
    )
    assert data == (
        b"To: a@example.test,\n b@example.test\n"
        b"Cc: undisclosed-recipients:;\nX-Keep: \xc3\xa9t\xc3\xa9\n"
        b"From: s@example.test\r\n\nBcc: in the body\n"
    )
    assert found == [
        ("To: header", "a@example.test, b@example.test"),
        ("Bcc: header", "hidden@example.test"),
        ("Cc: header", "undisclosed-recipients:;"),
    ]


def test_prepare_message_keeps_a_headerless_text_a_body() -> None:
    # An mbox "From " line is dropped; text that is no header field stays body.
    data, found = prepare_message(
        b"From someone Mon Jan  1 00:00:00 2024\nhello: world?\nno header here\n",
        sender="",
        hostname=HOSTNAME,
        full_name="Jörg",
        extract=False,
    )
    assert found == []
    head, _, body = data.partition(b"\r\n\r\n")
    # the null sender (-f '<>') is no author: From: names the login instead
    assert head.startswith(b"hello: world?\nFrom: =?utf-8?b?SsO2cmc=?= <")  # RFC 2047
    assert head.endswith(f"@{HOSTNAME}>".encode())
    assert body == b"no header here\n"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("0.0.0.0:2525", ("127.0.0.1", 2525)),  # a wildcard listener is reached on loopback
        ("[::]:2525", ("::1", 2525)),
        ("[::1]:25", ("::1", 25)),
        ("127.0.0.2:26", ("127.0.0.2", 26)),
    ],
)
def test_target_is_the_first_smtp_listener_seen_from_here(
    tmp_path: Path, address: str, expected: tuple[str, int]
) -> None:
    config = Config.from_mapping(
        {
            "listen": [
                {"address": "127.0.0.1:2587", "mode": "submission"},
                {"address": address, "mode": "smtp"},
                {"address": "127.0.0.1:2600", "mode": "smtp"},
            ]
        },
        base_dir=tmp_path,
    )
    assert submission_target(config) == expected
