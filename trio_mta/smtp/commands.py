"""SMTP command lines to typed values and back (RFC 5321 §4.1; RFCs 1870, 3030, 3461, 4954,
6152, 6531).

:func:`parse_command` is strict where leniency has bitten MTAs before (line
length, stray CR/LF, unknown or repeated ESMTP parameters) and tolerant only
where every real client deviates the same harmless way (``MAIL FROM: <a@b>``).
Every rejection is a :class:`CommandError` whose ``reply`` the server sends.
:func:`format_command` is its inverse: ``parse_command(format_command(c)[:-2]) == c``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from trio_mta.smtp.address import Path, echo, match_path
from trio_mta.smtp.errors import CommandError, LocalProtocolError
from trio_mta.smtp.replies import Reply

#: RFC 5321 §4.5.3.1.4: command line including CRLF.
MAX_LINE = 512
#: MAIL may be longer: RFC 1870 §3 (SIZE, +26), RFC 4954 §5 (AUTH=, +500) and
#: RFC 3461 §5 (RET and ENVID, +100).
MAX_MAIL_LINE = MAX_LINE + 26 + 500 + 100
#: RCPT may be longer: RFC 3461 §5 (NOTIFY and ORCPT, +500).
MAX_RCPT_LINE = MAX_LINE + 500

BodyType: TypeAlias = Literal["7BIT", "8BITMIME", "BINARYMIME"]
_BODY_TYPES: dict[str, BodyType] = {
    "7BIT": "7BIT",
    "8BITMIME": "8BITMIME",
    "BINARYMIME": "BINARYMIME",
}
Ret: TypeAlias = Literal["FULL", "HDRS"]
#: RFC 3461 §4.1 NOTIFY keywords, in the order :func:`format_command` writes them.
NOTIFY_ORDER = ("SUCCESS", "FAILURE", "DELAY")
MAX_ENVID = 100  # RFC 3461 §4.4: characters of the xtext
MAX_ORCPT = 500  # RFC 3461 §4.2: characters of the whole value


@dataclass(frozen=True)
class Ehlo:
    domain: str


@dataclass(frozen=True)
class Helo:
    domain: str


@dataclass(frozen=True)
class MailParams:
    """The MAIL parameters we implement; anything else is refused at parse time."""

    size: int | None = None
    body: BodyType | None = None
    smtputf8: bool = False
    auth: str | None = None  # RFC 4954 §5 AUTH=, xtext-decoded; "<>" stays "<>"
    ret: Ret | None = None  # RFC 3461 §4.3: what a DSN returns of the message
    envid: str | None = None  # RFC 3461 §4.4, xtext-decoded: echoed as Original-Envelope-Id


@dataclass(frozen=True)
class Mail:
    path: Path
    params: MailParams = MailParams()


@dataclass(frozen=True)
class RcptParams:
    """RFC 3461 RCPT parameters; anything else is refused at parse time.

    ``notify`` is ``("NEVER",)`` or a non-empty subset of :data:`NOTIFY_ORDER`
    in that order (None: not given, which means FAILURE, §4.1); ``orcpt`` is
    the xtext-decoded address of an ``rfc822`` ORCPT (§4.2).
    """

    notify: tuple[str, ...] | None = None
    orcpt: str | None = None


@dataclass(frozen=True)
class Rcpt:
    path: Path
    params: RcptParams = RcptParams()


@dataclass(frozen=True)
class Data:
    pass


@dataclass(frozen=True)
class Bdat:
    size: int
    last: bool = False


@dataclass(frozen=True)
class Rset:
    pass


@dataclass(frozen=True)
class Noop:
    arg: str = ""


@dataclass(frozen=True)
class Quit:
    """QUIT; the server machine also emits this very class as its Quit event."""


@dataclass(frozen=True)
class Vrfy:
    arg: str


@dataclass(frozen=True)
class Help:
    arg: str = ""


@dataclass(frozen=True)
class StartTls:
    pass


@dataclass(frozen=True)
class Auth:
    mechanism: str  # upper case
    initial_response: str | None = None  # base64 text as sent; "=" is the empty response


Command: TypeAlias = (
    Ehlo | Helo | Mail | Rcpt | Data | Bdat | Rset | Noop | Quit | Vrfy | Help | StartTls | Auth
)


def _err(code: int, status: str, text: str) -> CommandError:
    return CommandError(Reply(code, status, text))


_TOO_LONG = Reply(500, "5.5.2", "Line too long")
_BARE_CR_LF = Reply(500, "5.5.2", "Bare CR or LF in command line")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
_C1_OR_SEPARATOR = re.compile("[\x80-\x9f\u2028\u2029]")
_FROM = re.compile(r"(?i:FROM): *(?=<)")
_TO = re.compile(r"(?i:TO): *(?=<)")
_NO_MAIL_PARAMS = MailParams()
_NO_RCPT_PARAMS = RcptParams()
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")  # esmtp-keyword
_VALUE = re.compile("[\\x21-\\x3c\\x3e-\\x7e\u0080-\U0010ffff]+\\Z")  # esmtp-value (+RFC 6531)
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")  # RFC 3461 §4
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_BDAT = re.compile(r"([0-9]{1,18})(?: +(?i:(LAST)))?\Z")
_AUTH = re.compile(r"([A-Za-z0-9_-]{1,20})(?: +([^ ]+))?\Z")  # RFC 4954 §4 sasl-mech
_TOKEN = re.compile(r"[^ ]+\Z")

# RFC 5321 §4.5.1 and friends: known verbs we do not implement get 502, not 500.
_NOT_IMPLEMENTED = frozenset(
    (b"EXPN", b"TURN", b"ETRN", b"ATRN", b"SEND", b"SOML", b"SAML", b"VERB", b"ONEX", b"BURL")
)


def _no_args(name: str, cmd: Data | Rset | Quit | StartTls) -> Callable[[str, bool], Command]:
    def parse(rest: str, utf8_ok: bool) -> Command:
        if rest:
            raise _err(501, "5.5.2", f"Syntax: {name} (no parameters allowed)")
        return cmd

    return parse


def _hello(cls: type[Ehlo] | type[Helo], name: str) -> Callable[[str, bool], Command]:
    def parse(rest: str, utf8_ok: bool) -> Command:
        # RFC 5321 §4.1.1.1 asks for a domain or address literal; real clients
        # send "my_pc" or worse, and refusing them buys nothing, so any one
        # printable token is taken (non-ASCII only with SMTPUTF8, RFC 6531 §3.7.1).
        if not _TOKEN.match(rest) or (not utf8_ok and not rest.isascii()):
            raise _err(501, "5.5.2", f"Syntax: {name} hostname")
        if _C1_OR_SEPARATOR.search(rest):
            # C0 never gets here; NEL or U+2028 would break the log line or header it lands in.
            raise _err(501, "5.5.2", f"Control character in {name} hostname")
        return cls(rest)

    return parse


def _parse_mail(rest: str, utf8_ok: bool) -> Command:
    prefix = _FROM.match(rest)
    if prefix is None:
        raise _err(501, "5.5.2", "Syntax: MAIL FROM:<address>")
    path, end = match_path(
        rest, prefix.end(), smtputf8=True, allow_null=True, allow_postmaster=False
    )
    params = _NO_MAIL_PARAMS
    if end != len(rest):
        params = _mail_params(_params_text(rest, end, "Syntax: MAIL FROM:<address>"))
    if not (utf8_ok or params.smtputf8 or rest.isascii() or rest[:end].isascii()):
        raise _err(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")  # RFC 6531 §3.5
    return Mail(path, params)


def _parse_rcpt(rest: str, utf8_ok: bool) -> Command:
    prefix = _TO.match(rest)
    if prefix is None:
        raise _err(501, "5.5.2", "Syntax: RCPT TO:<address>")
    path, end = match_path(
        rest, prefix.end(), smtputf8=True, allow_null=False, allow_postmaster=True
    )
    params = _NO_RCPT_PARAMS
    if end != len(rest):
        params = _rcpt_params(_params_text(rest, end, "Syntax: RCPT TO:<address>"))
    if not (utf8_ok or rest.isascii() or rest[:end].isascii()):
        raise _err(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")  # RFC 6531 §3.5
    return Rcpt(path, params)


def _params_text(rest: str, end: int, syntax: str) -> list[str]:
    tail = rest[end:]
    if tail and tail[0] != " ":
        raise _err(501, "5.5.2", syntax)
    return tail.split(" ") if tail.strip(" ") else []


def _split_params(tokens: list[str]) -> list[tuple[str, bool, str]]:
    """(upper-case keyword, has "=", value) per parameter; a repeated keyword is refused."""
    out = []
    seen: set[str] = set()
    for token in tokens:
        if not token:
            continue
        key, eq, value = token.partition("=")
        key = key.upper()
        if key in seen:
            raise _err(555, "5.5.4", f"Duplicate parameter: {echo(key, 40)}")
        seen.add(key)
        out.append((key, bool(eq), value))
    return out


def _refuse_param(key: str, eq: bool, value: str) -> CommandError:
    if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
        token = f"{key}={value}" if eq else key
        return _err(555, "5.5.4", f"Malformed parameter: {echo(token, 40)}")
    return _err(555, "5.5.4", f"Unsupported parameter: {echo(key, 40)}")


def _mail_params(tokens: list[str]) -> MailParams:
    """The parameters we offer; each is validated by its own rule, so the
    generic esmtp-keyword/value grammar is only consulted to word the refusal
    of anything else."""
    size: int | None = None
    body: BodyType | None = None
    smtputf8 = False
    auth: str | None = None
    ret: Ret | None = None
    envid: str | None = None
    for key, eq, value in _split_params(tokens):
        if key == "SIZE":
            if not (eq and value.isdigit() and value.isascii() and len(value) <= 20):
                raise _err(555, "5.5.4", "Invalid value for SIZE")
            size = int(value)  # RFC 1870 §3
        elif key == "BODY":
            body = _BODY_TYPES.get(value.upper()) if eq else None  # RFC 6152 §2, 3030 §3
            if body is None:
                raise _err(555, "5.5.4", "Invalid value for BODY")
        elif key == "SMTPUTF8":
            if eq:
                raise _err(555, "5.5.4", "Invalid value for SMTPUTF8")
            smtputf8 = True  # RFC 6531 §3.4
        elif key == "AUTH":
            if not value:
                raise _err(555, "5.5.4", "Invalid value for AUTH")
            # RFC 4954 §5
            auth = _xtext_decode(value, _err(555, "5.5.4", "Invalid value for AUTH"))
        elif key == "RET":
            upper = value.upper() if eq else ""
            if upper not in ("FULL", "HDRS"):
                raise _err(501, "5.5.4", "Invalid value for RET (FULL or HDRS)")
            ret = "FULL" if upper == "FULL" else "HDRS"  # RFC 3461 §4.3
        elif key == "ENVID":
            bad = _err(501, "5.5.4", f"Invalid value for ENVID (xtext, at most {MAX_ENVID})")
            if not value or len(value) > MAX_ENVID:
                raise bad
            envid = _xtext_decode(value, bad)  # RFC 3461 §4.4
            if not envid.isascii():
                raise bad
        else:
            raise _refuse_param(key, eq, value)
    return MailParams(size=size, body=body, smtputf8=smtputf8, auth=auth, ret=ret, envid=envid)


def _rcpt_params(tokens: list[str]) -> RcptParams:
    """RFC 3461 §4.1-4.2 NOTIFY and ORCPT; malformed values get 501 5.5.4 (§5.2)."""
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    for key, eq, value in _split_params(tokens):
        if key == "NOTIFY":
            notify = _notify(value if eq else "")
        elif key == "ORCPT":
            bad = _err(501, "5.5.4", "Invalid value for ORCPT (rfc822;xtext)")
            kind, semi, address = value.partition(";")
            if kind.lower() != "rfc822":
                if semi and kind:
                    raise _err(501, "5.5.4", "Unsupported ORCPT address type (only rfc822)")
                raise bad
            if not address or len(value) > MAX_ORCPT:
                raise bad
            orcpt = _xtext_decode(address, bad)
        else:
            raise _refuse_param(key, eq, value)
    return RcptParams(notify=notify, orcpt=orcpt)


def _notify(value: str) -> tuple[str, ...]:
    """NEVER alone, or SUCCESS/FAILURE/DELAY each at most once (RFC 3461 §4.1)."""
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return ("NEVER",)
    if "NEVER" in words:
        raise _err(501, "5.5.4", "NOTIFY=NEVER cannot be combined with other values")
    if len(set(words)) != len(words):
        raise _err(501, "5.5.4", "Duplicate value in NOTIFY")
    if not words or not set(words) <= set(NOTIFY_ORDER):
        raise _err(501, "5.5.4", "Invalid value for NOTIFY (NEVER or SUCCESS,FAILURE,DELAY)")
    return tuple(word for word in NOTIFY_ORDER if word in words)


def xtext_decode(value: str) -> str:
    """RFC 3461 §4 xtext to text (UTF-8 octets); ValueError for invalid xtext."""
    try:
        return _xtext_decode(value, _err(501, "5.5.4", "Invalid xtext"))
    except CommandError as exc:
        raise ValueError(str(exc.reply)) from None


def _xtext_decode(value: str, bad: CommandError) -> str:
    if not _XTEXT.match(value):
        raise bad
    raw = _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
    try:
        decoded = raw.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise bad from None
    if _CONTROL.search(decoded):
        raise bad
    return decoded


def xtext_encode(value: str) -> str:
    """Text as RFC 3461 §4 xtext: "+", "=" and octets outside "!".."~" become "+XX"."""
    return _xtext_encode(value)


def _xtext_encode(value: str) -> str:
    out = []
    for byte in value.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def _parse_bdat(rest: str, utf8_ok: bool) -> Command:
    match = _BDAT.match(rest)
    if match is None:
        raise _err(501, "5.5.2", "Syntax: BDAT size [LAST]")
    return Bdat(int(match.group(1)), match.group(2) is not None)


def _parse_auth(rest: str, utf8_ok: bool) -> Command:
    match = _AUTH.match(rest)
    if match is None:
        raise _err(501, "5.5.2", "Syntax: AUTH mechanism [initial-response]")
    return Auth(match.group(1).upper(), match.group(2))


def _parse_vrfy(rest: str, utf8_ok: bool) -> Command:
    if not rest:
        raise _err(501, "5.5.2", "Syntax: VRFY address")
    return Vrfy(rest)


_PARSERS: dict[bytes, Callable[[str, bool], Command]] = {
    b"EHLO": _hello(Ehlo, "EHLO"),
    b"HELO": _hello(Helo, "HELO"),
    b"MAIL": _parse_mail,
    b"RCPT": _parse_rcpt,
    b"DATA": _no_args("DATA", Data()),
    b"BDAT": _parse_bdat,
    b"RSET": _no_args("RSET", Rset()),
    b"NOOP": lambda rest, utf8_ok: Noop(rest),
    b"QUIT": _no_args("QUIT", Quit()),
    b"VRFY": _parse_vrfy,
    b"HELP": lambda rest, utf8_ok: Help(rest),
    b"STARTTLS": _no_args("STARTTLS", StartTls()),
    b"AUTH": _parse_auth,
}


def max_line_length(line: bytes) -> int:
    """The most octets, CRLF included, a command line starting with ``line`` may have.

    Only the first five octets matter (MAIL and RCPT may be longer), so the
    server can apply the same limit to a line it has not finished receiving.
    """
    verb = line[:5].upper()
    if verb == b"MAIL ":
        return MAX_MAIL_LINE
    return MAX_RCPT_LINE if verb == b"RCPT " else MAX_LINE


def parse_command(line: bytes, *, smtputf8_ok: bool = True) -> Command:
    """Parse one command line given WITHOUT its CRLF.

    ``smtputf8_ok``: non-ASCII is acceptable in this line even without a
    SMTPUTF8 parameter on it: for RCPT, the transaction's MAIL carried
    SMTPUTF8 (RFC 6531 §3.4); a MAIL line may always enable it for itself.
    """
    if len(line) > MAX_LINE - 2 and len(line) + 2 > max_line_length(line):
        raise CommandError(_TOO_LONG)
    control = _CONTROL_BYTES.search(line)
    if control is not None and (b"\r" in line or b"\n" in line):
        raise CommandError(_BARE_CR_LF)
    verb, _, rest_bytes = line.partition(b" ")
    verb = verb.upper()
    parser = _PARSERS.get(verb)
    if parser is None:
        if verb in _NOT_IMPLEMENTED:
            raise _err(502, "5.5.1", "Command not implemented")
        raise _err(500, "5.5.1", "Command unrecognized")
    if control is not None:
        raise _err(501, "5.5.2", "Control character in command")
    try:
        rest = rest_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise _err(501, "5.5.2", "Invalid UTF-8 in command") from None
    return parser(rest.strip(" "), smtputf8_ok)


def format_rcpt_params(params: RcptParams) -> str:
    """The RCPT parameters as sent on the wire, each preceded by a space."""
    out = []
    if params.notify is not None:
        out.append(f" NOTIFY={','.join(params.notify)}")
    if params.orcpt is not None:
        out.append(f" ORCPT=rfc822;{_xtext_encode(params.orcpt)}")
    return "".join(out)


def format_mail_params(params: MailParams) -> str:
    """The MAIL parameters as sent on the wire, each preceded by a space."""
    out = []
    if params.size is not None:
        out.append(f" SIZE={params.size}")
    if params.body is not None:
        out.append(f" BODY={params.body}")
    if params.smtputf8:
        out.append(" SMTPUTF8")
    if params.auth is not None:
        out.append(f" AUTH={_xtext_encode(params.auth)}")
    if params.ret is not None:
        out.append(f" RET={params.ret}")
    if params.envid is not None:
        out.append(f" ENVID={_xtext_encode(params.envid)}")
    return "".join(out)


def _format_text(cmd: Command) -> str:
    match cmd:
        case Ehlo(domain):
            return f"EHLO {domain}"
        case Helo(domain):
            return f"HELO {domain}"
        case Mail(path, params):
            return f"MAIL FROM:<{path}>{format_mail_params(params)}"
        case Rcpt(path, params):
            return f"RCPT TO:<{path}>{format_rcpt_params(params)}"
        case Data():
            return "DATA"
        case Bdat(size, last):
            return f"BDAT {size} LAST" if last else f"BDAT {size}"
        case Rset():
            return "RSET"
        case Noop(arg):
            return f"NOOP {arg}" if arg else "NOOP"
        case Quit():
            return "QUIT"
        case Vrfy(arg):
            return f"VRFY {arg}"
        case Help(arg):
            return f"HELP {arg}" if arg else "HELP"
        case StartTls():
            return "STARTTLS"
        case Auth(mechanism, None):
            return f"AUTH {mechanism}"
        case Auth(mechanism, response):
            return f"AUTH {mechanism} {response}"
    raise LocalProtocolError(f"not a command: {cmd!r}")


def format_command(cmd: Command) -> bytes:
    """The command line WITH its CRLF; refuses values that would break the line."""
    text = _format_text(cmd)
    if _CONTROL.search(text):
        # A CR/LF smuggled in through a field would inject a second command.
        raise LocalProtocolError(f"control character in command: {text[:80]!r}")
    return f"{text}\r\n".encode()
