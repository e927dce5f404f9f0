"""The SMTP protocol as pure state machines over bytes (sans-IO, h11 style).

No trio, sockets, files, clocks or logging in here: the server and client
conversations, command parsing, replies, DATA/BDAT framing and dot-stuffing
are plain objects fed with bytes, so they are tested and fuzzed at full speed
and reused by the inbound server and the outbound delivery alike.
"""

from trio_mta.smtp.address import Path, parse_path
from trio_mta.smtp.client import (
    AuthResult,
    ClientConnection,
    ClientEvent,
    CommandResult,
    DsnRequest,
    Greeting,
    HelloResult,
    StartTlsResult,
    TransactionResult,
)
from trio_mta.smtp.commands import (
    Auth,
    Bdat,
    Command,
    Data,
    Ehlo,
    Helo,
    Help,
    Mail,
    MailParams,
    Noop,
    Quit,
    Rcpt,
    RcptParams,
    Rset,
    StartTls,
    Vrfy,
    format_command,
    parse_command,
)
from trio_mta.smtp.data import DataReader, dot_stuff
from trio_mta.smtp.errors import CommandError, LocalProtocolError, ReplyError, SMTPProtocolError
from trio_mta.smtp.events import (
    NEED_DATA,
    AuthAttempt,
    BodyChunk,
    ConnectionClosed,
    DataStarted,
    EndOfMessage,
    Event,
    Hello,
    MailFrom,
    MessageRefused,
    RcptTo,
    StartTlsRequest,
    TransactionReset,
)
from trio_mta.smtp.replies import Reply, ReplyParser
from trio_mta.smtp.server import ServerConnection

__all__ = [
    "NEED_DATA",
    "Auth",
    "AuthAttempt",
    "AuthResult",
    "Bdat",
    "BodyChunk",
    "ClientConnection",
    "ClientEvent",
    "Command",
    "CommandError",
    "CommandResult",
    "ConnectionClosed",
    "Data",
    "DataReader",
    "DataStarted",
    "DsnRequest",
    "Ehlo",
    "EndOfMessage",
    "Event",
    "Greeting",
    "Hello",
    "HelloResult",
    "Helo",
    "Help",
    "LocalProtocolError",
    "Mail",
    "MailFrom",
    "MailParams",
    "MessageRefused",
    "Noop",
    "Path",
    "Quit",
    "Rcpt",
    "RcptParams",
    "RcptTo",
    "Reply",
    "ReplyError",
    "ReplyParser",
    "Rset",
    "SMTPProtocolError",
    "ServerConnection",
    "StartTls",
    "StartTlsRequest",
    "StartTlsResult",
    "TransactionReset",
    "TransactionResult",
    "Vrfy",
    "dot_stuff",
    "format_command",
    "parse_command",
    "parse_path",
]
