"""``trio-mta sendmail``: the sendmail-compatible submission command (SPEC §2).

cron, ``mail``, git and PHP hand a message to ``sendmail`` on stdin and judge
the outcome by the exit status alone, so both follow classic sendmail: flags
parsed the way its getopt parses them (``-oi``, ``-ti``, ``-fSENDER``), and
exit codes from ``sysexits.h``. The message is not written anywhere locally:
it goes over loopback SMTP to the running server's first ``smtp`` listener,
where it enters the same durable queue as any other mail. Success is silent
(cron mails whatever a job prints); every failure is one line per cause on
stderr, carrying the server's own reply text when there is one.
"""

from __future__ import annotations

import email.utils
import getopt
import getpass
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Final, TextIO

import trio

from trio_mta.client import SMTPClient, SMTPClientError, SMTPConnectError, SMTPResponseError
from trio_mta.config import Config, ConfigError
from trio_mta.config.schema import format_host_port
from trio_mta.smtp.address import Path, parse_path
from trio_mta.smtp.errors import CommandError
from trio_mta.smtp.replies import Reply

__all__ = [
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_IOERR",
    "EX_OK",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "SendmailError",
    "run_sendmail",
]

# sysexits.h
EX_OK: Final = 0
EX_USAGE: Final = 64
EX_DATAERR: Final = 65
EX_UNAVAILABLE: Final = 69
EX_IOERR: Final = 74
EX_TEMPFAIL: Final = 75
EX_CONFIG: Final = 78

PROG: Final = "trio-mta sendmail"
USAGE: Final = (
    f"usage: {PROG} [-t] [-i] [-f SENDER] [-F NAME] [--config FILE] [RCPT ...]\n"
    "  -t          recipients also from To:, Cc: and Bcc: (Bcc: is removed)\n"
    "  -i, -oi     a line holding a single '.' does not end the message\n"
    "  -f, -r ADDR envelope sender (default: login@hostname)\n"
    "  -F NAME     full name for the From: header, when the message has none\n"
    "  -bm, -B, -o...  accepted for compatibility and ignored"
)

# getopt letters, as sendmail's own getopt() takes them: -oi is "-o i", -bm is "-b m".
_OPTIONS: Final = "tif:r:F:o:b:B:"
_WITH_VALUE: Final = frozenset("frFobB")
_LONE_DOT: Final = frozenset((b".\n", b".\r\n", b"."))
# RFC 5322 §3.6.8 field name, and the obsolete WSP before the colon (§4.5).
_FIELD: Final = re.compile(rb"[!-9;-~]+[ \t]*:")
_FOLD: Final = re.compile(rb"\r?\n(?=[ \t])")
_RECIPIENT_FIELDS: Final = ("to", "cc", "bcc")


class SendmailError(Exception):
    """A failure that ends the command with ``code`` (sysexits.h) after printing ``lines``."""

    def __init__(self, code: int, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.code = code
        self.lines = lines


@dataclass
class Options:
    config_path: str | None = None
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i / -oi
    sender: str | None = None  # -f / -r, as given
    full_name: str | None = None  # -F
    recipients: list[str] = field(default_factory=list)


def run_sendmail(
    argv: Sequence[str],
    *,
    config_path: str | None = None,
    stdin: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The whole command: parse ``argv``, read the message, submit; returns the exit status.

    ``config_path`` is a ``--config`` given before the subcommand; one among
    ``argv`` wins, then ``TRIO_MTA_CONFIG``, then the built-in defaults.
    ``stdin``/``stderr`` default to the process's own. It calls ``trio.run``,
    so a trio program runs it in a thread (``trio.to_thread.run_sync``).
    """
    if "--help" in argv[: argv.index("--") if "--" in argv else len(argv)]:
        print(USAGE)
        return EX_OK
    try:
        options = parse_args(argv)
        config = _load_config(options.config_path or config_path)
        host, port = submission_target(config)
        sender = envelope_sender(options.sender, config.hostname)
        recipients = _recipients(
            (("argument", text) for text in options.recipients), config, EX_USAGE
        )
        if not recipients and not options.extract:
            raise SendmailError(EX_USAGE, "no recipients given (name them or use -t)")
        if stdin is None and sys.stdin is None:
            raise SendmailError(EX_IOERR, "no standard input to read the message from")
        raw = read_message(stdin or sys.stdin.buffer, ignore_dots=options.ignore_dots)
        data, found = prepare_message(
            raw,
            sender=sender,
            hostname=config.hostname,
            full_name=options.full_name,
            extract=options.extract,
        )
        recipients = list(dict.fromkeys([*recipients, *_recipients(found, config, EX_DATAERR)]))
        if not recipients:
            raise SendmailError(EX_USAGE, "no recipients: none given and none in To:, Cc: or Bcc:")
        return trio.run(submit, host, port, config.hostname, sender, recipients, data)
    except SendmailError as exc:
        for line in exc.lines:
            print(f"{PROG}: {line}", file=stderr or sys.stderr)
        return exc.code


# --- command line -----------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Options:
    """sendmail's flags; anything unknown is EX_USAGE.

    Only ``-t``, ``-i``/``-oi``, ``-f``/``-r`` and ``-F`` change anything.
    ``-bm`` is the one mode there is; other ``-o`` options, ``-B`` (body
    type, given by cron) and the delivery modes ``-odb``/``-odi`` are
    accepted and ignored, as Postfix does, since the server decides those.
    """
    options = Options()
    rest = _take_config(list(argv), options)
    try:
        flags, options.recipients = getopt.gnu_getopt(rest, _OPTIONS)
    except getopt.GetoptError as exc:
        raise SendmailError(EX_USAGE, f"{exc.msg} (see {PROG} --help)") from None
    for flag, value in flags:
        if flag == "-t":
            options.extract = True
        elif flag == "-i" or (flag == "-o" and value == "i"):
            options.ignore_dots = True
        elif flag in ("-f", "-r"):
            options.sender = value
        elif flag == "-F":
            options.full_name = value
        elif flag == "-b" and value != "m":
            raise SendmailError(EX_USAGE, f"-b{value}: only -bm (deliver mail) is supported")
    return options


def _take_config(argv: list[str], options: Options) -> list[str]:
    """Remove ``--config FILE`` / ``--config=FILE`` (SPEC §2: also after the subcommand).

    Values of value-taking flags are skipped, so ``-F --config`` stays a name.
    """
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest.append(arg)
            rest.extend(args)
        elif arg == "--config" or arg.startswith("--config="):
            value = arg.partition("=")[2] if "=" in arg else next(args, None)
            if not value:
                raise SendmailError(EX_USAGE, "--config needs a file name")
            options.config_path = value
        else:
            rest.append(arg)
            if _wants_next(arg):
                rest.append(next(args, ""))
    return rest


def _wants_next(arg: str) -> bool:
    """True for a flag cluster like ``-tf`` whose last letter takes the next argument."""
    if not arg.startswith("-") or arg.startswith("--"):
        return False
    for index, letter in enumerate(arg[1:], 1):
        if letter in _WITH_VALUE:
            return index == len(arg) - 1
    return False


# --- configuration and addresses ----------------------------------------------------


def _load_config(path: str | None) -> Config:
    path = path or os.environ.get("TRIO_MTA_CONFIG") or None
    try:
        return Config.load(path) if path else Config.default()
    except ConfigError as exc:
        raise SendmailError(EX_CONFIG, *(f"config: {line}" for line in exc.errors)) from None


def submission_target(config: Config) -> tuple[str, int]:
    """Address and port of the first ``smtp`` listener, as seen from this machine.

    It must be a listener where our loopback address is a trusted network:
    there the server relays for us without AUTH and completes Date: and
    Message-ID: (RFC 6409 §8). submission and smtps demand a password that a
    cron job does not have, so they are no fallback.
    """
    source = config.source or "the built-in defaults"
    listener = next((item for item in config.listen if item.mode == "smtp"), None)
    if listener is None:
        raise SendmailError(
            EX_CONFIG,
            f'{source} has no [[listen]] of mode "smtp"; sendmail '
            "submits there (submission and smtps need a password)",
        )
    if listener.port == 0:
        raise SendmailError(
            EX_CONFIG,
            f"listener {listener.address} has port 0, chosen anew by "
            "each server start; sendmail cannot know it",
        )
    host = _connect_address(listener.host, listener.port)
    address = ipaddress.ip_address(host)
    if not any(address in network for network in config.relay.trusted_networks):
        raise SendmailError(
            EX_CONFIG,
            f"{host} is not in [relay].trusted_networks, so the smtp "
            f"listener {listener.address} would not relay for sendmail",
        )
    return host, listener.port


def _connect_address(host: str, port: int) -> str:
    """The IP to connect to: a wildcard listener is reached on loopback, a name resolved.

    Connecting to one of the machine's own addresses uses that address as
    the source, so this IP is also the client address the server judges.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            code = EX_TEMPFAIL if exc.errno == socket.EAI_AGAIN else EX_CONFIG
            raise SendmailError(
                code, f"cannot resolve listener host {host}: {exc.strerror}"
            ) from None
        return str(infos[0][4][0])
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return str(address)


def envelope_sender(given: str | None, hostname: str) -> str:
    """``-f`` (``<>`` and ``""`` are the null sender), else ``login@hostname``."""
    if given is None:
        return str(Path(_login_name(), hostname))
    address = "" if given.strip() in ("", "<>") else email.utils.parseaddr(given)[1]
    if given.strip() not in ("", "<>") and not address:
        raise SendmailError(EX_USAGE, f"-f {given!r}: no address in it")
    if address and "@" not in address:
        address = f"{address}@{hostname}"
    try:
        return str(parse_path(f"<{address}>", smtputf8=True, allow_null=True))
    except CommandError:
        raise SendmailError(EX_USAGE, f"-f {given!r}: not a valid sender address") from None


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (containers)
        return f"uid{os.getuid()}"


def _recipients(sources: Iterable[tuple[str, str]], config: Config, code: int) -> list[str]:
    """Addresses out of ``(where, text)`` arguments or header values.

    Each text may be a list, with ``Name <addr>`` forms and groups. Text that
    yields no address is an error (exit ``code``), except a group, which may
    be empty ("undisclosed-recipients:;"). An address without a domain is a
    local user, as in sendmail: it gets the first local domain, where the
    server keeps mailboxes.
    """
    out: list[str] = []
    for where, text in sources:
        addresses = [address for _, address in email.utils.getaddresses([text]) if address]
        if not addresses and text.strip() and ":" not in text:
            raise SendmailError(code, f"{where} {text!r}: no address in it")
        for address in addresses:
            if "@" not in address:
                address = f"{address}@{config.local.domains[0]}"
            try:
                out.append(str(parse_path(f"<{address}>", smtputf8=True, allow_null=False)))
            except CommandError:
                raise SendmailError(
                    code, f"{where} {text!r}: {address} is not a valid recipient"
                ) from None
    return out


# --- the message ----------------------------------------------------------------------


def read_message(stream: BinaryIO, *, ignore_dots: bool) -> bytes:
    """stdin up to EOF or, without ``-i``, up to a line holding a single dot.

    The lone-dot rule is classic sendmail's end of interactive input; the
    dot line itself is not part of the message.
    """
    try:
        if ignore_dots:
            return stream.read()
        lines: list[bytes] = []
        for line in stream:
            if line in _LONE_DOT:
                break
            lines.append(line)
        return b"".join(lines)
    except OSError as exc:
        raise SendmailError(EX_IOERR, f"reading the message: {exc.strerror or exc}") from None


def prepare_message(
    raw: bytes, *, sender: str, hostname: str, full_name: str | None, extract: bool
) -> tuple[bytes, list[tuple[str, str]]]:
    """(bytes to send, ``(where, text)`` of To/Cc/Bcc when ``extract``) for ``raw``.

    Header fields are edited as bytes, never re-serialised, so the rest of
    the message reaches the server exactly as given. Bcc: is dropped whether
    or not ``-t`` used it: it names recipients the others must not see (RFC
    5322 §3.6.3). A missing From: gets the sender (RFC 5322 §3.6.2).
    """
    if b"\0" in raw:
        raise SendmailError(
            EX_DATAERR,
            "the message contains NUL bytes, which no mail may carry (RFC 5322 §3.5, RFC 6152)",
        )
    if raw.startswith(b"From "):
        raw = raw.partition(b"\n")[2]  # an mbox separator line, not a header field
    fields, body = split_header(raw)
    found: list[tuple[str, str]] = []
    kept: list[bytes] = []
    has_from = False
    for line in fields:
        name, _, value = line.partition(b":")
        name = name.rstrip(b" \t").lower()
        if extract and name.decode("ascii") in _RECIPIENT_FIELDS:
            text = _FOLD.sub(b"", value).strip().decode("utf-8", "surrogateescape")
            found.append((f"{name.decode('ascii').capitalize()}: header", text))
        has_from = has_from or name == b"from"
        if name != b"bcc":
            kept.append(line if line.endswith(b"\n") else line + b"\r\n")
    if not has_from:
        author = sender or str(Path(_login_name(), hostname))
        from_field = email.utils.formataddr((full_name or "", author))
        kept.append(f"From: {from_field}\r\n".encode())
    if body and body[:1] not in (b"\r", b"\n"):
        body = b"\r\n" + body  # the body began right after the fields: keep it a body
    return b"".join(kept) + (body or b"\r\n"), found


def split_header(raw: bytes) -> tuple[list[bytes], bytes]:
    """(header fields with their folded lines and line ends, everything after them).

    The header section ends at the first line that is neither a field nor
    the continuation of one; the empty separator line belongs to the rest.
    """
    fields: list[bytes] = []
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end + 1
        line = raw[pos:end]
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        elif _FIELD.match(line):
            fields.append(line)
        else:
            break
        pos = end
    return fields, raw[pos:]


# --- submission -------------------------------------------------------------------------


async def submit(
    host: str, port: int, helo: str, sender: str, recipients: Sequence[str], data: bytes
) -> int:
    """Send over loopback: EX_OK when every recipient was accepted, else a
    :class:`SendmailError` naming each refused one with the server's reply.

    Recipients refused with 452 (too many recipients) while others were
    accepted go again in a new transaction, as RFC 5321 §4.5.3.1.10 asks.
    """
    try:
        client = await SMTPClient.connect(host, port, helo_name=helo, tls="none")
    except SMTPConnectError as exc:
        where = format_host_port(host, port)
        raise SendmailError(
            EX_TEMPFAIL, f"cannot reach the trio-mta server at {where}; is it running? ({exc})"
        ) from None
    except SMTPClientError as exc:
        raise _session_failure(exc) from None
    refused: dict[str, str] = {}
    codes: set[int] = set()
    async with client:
        pending = list(recipients)
        while pending:
            try:
                result = await client.send(sender, pending, data)
            except SMTPClientError as exc:
                failure = _session_failure(exc)
                refused.update(dict.fromkeys(pending, str(exc)))
                codes.add(failure.code)
                break
            except ValueError as exc:  # the client's own checks (RFC 6531 without SMTPUTF8)
                raise SendmailError(EX_DATAERR, str(exc)) from None
            retry: dict[str, Reply] = {}
            accepted = False
            for rcpt, reply in zip(pending, result.outcomes, strict=True):
                if reply.code < 400:
                    accepted = True
                elif reply.code == 452 and client.usable:
                    retry[rcpt] = reply
                else:
                    refused[rcpt] = str(reply)
                    codes.add(refusal_exit_code(reply))
            if not accepted:  # no progress: a new transaction would fare no better
                refused.update((rcpt, str(reply)) for rcpt, reply in retry.items())
                if retry:
                    codes.add(EX_TEMPFAIL)
                retry = {}
            pending = list(retry)
    if not refused:
        return EX_OK
    lines = [f"{rcpt}: {why}" for rcpt, why in refused.items()]
    if len(refused) < len(recipients):
        lines.append(f"queued for the other {len(recipients) - len(refused)} recipient(s)")
    # A permanent cause wins: retrying the whole message would not cure it.
    raise SendmailError(min(codes, key=(EX_DATAERR, EX_UNAVAILABLE, EX_TEMPFAIL).index), *lines)


def refusal_exit_code(reply: Reply) -> int:
    """sysexits.h code for a refusal: 4xx retry later; 5.3.4 (too big) and 5.6.x (bad
    content) are the message's fault (RFC 3463); any other 5xx is final."""
    if reply.code < 500:
        return EX_TEMPFAIL
    status = reply.status or ""
    if status == "5.3.4" or status.startswith("5.6."):
        return EX_DATAERR
    return EX_UNAVAILABLE


def _session_failure(exc: SMTPClientError) -> SendmailError:
    """The server refused the session (greeting, EHLO) or the connection broke."""
    if isinstance(exc, SMTPResponseError):
        return SendmailError(refusal_exit_code(exc.reply), f"{exc.stage}: {exc.reply}")
    return SendmailError(EX_TEMPFAIL, str(exc))
