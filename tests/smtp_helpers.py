"""Shared pieces of the trio_mta.smtp tests: a server driver and hypothesis strategies."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from hypothesis import strategies as st

from trio_mta.smtp import (
    NEED_DATA,
    Auth,
    AuthAttempt,
    Bdat,
    BodyChunk,
    ClientConnection,
    ClientEvent,
    Command,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Event,
    Helo,
    Help,
    Mail,
    MailFrom,
    MailParams,
    Noop,
    Path,
    Quit,
    Rcpt,
    RcptTo,
    Reply,
    Rset,
    ServerConnection,
    StartTls,
    StartTlsRequest,
    Vrfy,
    format_command,
)
from trio_mta.smtp.commands import NOTIFY_ORDER, RcptParams, max_line_length

BANNER = Reply(220, None, "mx.test ESMTP")
PASSWORD = "secret"

Decider = Callable[[Event], Reply]


def make_server(**overrides: object) -> ServerConnection:
    """A server with the banner already sent; small limits so tests reach them."""
    options: dict[str, object] = {
        "hostname": "mx.test",
        "max_message_size": 10_000,
        "max_recipients": 5,
        "starttls": True,
    }
    options.update(overrides)
    server = ServerConnection(**options)  # type: ignore[arg-type]
    server.send_reply(BANNER)
    return server


def decide(event: Event) -> Reply:
    """Deterministic policy: local parts starting with "bad" are refused, TLS is not."""
    if isinstance(event, MailFrom):
        if event.path.local_part.startswith("bad"):
            return Reply(550, "5.7.1", "Sender refused")
        return Reply(250, "2.1.0", "Ok")
    if isinstance(event, RcptTo):
        if event.path.local_part.startswith("bad"):
            return Reply(550, "5.1.1", "No such user")
        return Reply(250, "2.1.5", "Ok")
    if isinstance(event, EndOfMessage):
        return Reply(250, "2.0.0", "Ok: queued as Q1")
    if isinstance(event, StartTlsRequest):
        return Reply(454, "4.7.0", "TLS not available")
    if isinstance(event, AuthAttempt):
        if event.password == PASSWORD:
            return Reply(235, "2.7.0", "Authentication successful")
        return Reply(535, "5.7.8", "Authentication credentials invalid")
    raise AssertionError(f"not a decision: {event!r}")


def pump(server: ServerConnection, decider: Decider = decide, on_tls: bool = False) -> list[Event]:
    """Run the server until it needs bytes; answer decisions with ``decider``.

    ``on_tls``: pretend the TLS handshake succeeds right after a 220 to STARTTLS.
    """
    events: list[Event] = []
    while True:
        event = server.next_event()
        if event is NEED_DATA:
            if on_tls and server.awaiting_tls:
                server.tls_established()
                continue
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events
        if isinstance(event, (MailFrom, RcptTo, EndOfMessage, StartTlsRequest, AuthAttempt)):
            server.send_reply(decider(event))


def feed(
    server: ServerConnection,
    chunks: Iterable[bytes],
    *,
    eof: bool = True,
    decider: Decider = decide,
) -> tuple[list[Event], bytes]:
    """Feed ``chunks`` one by one (each when the server asks), then EOF.

    Returns the events (consecutive BodyChunks merged, so that any split of
    the input gives the same list) and every byte the server sent.
    """
    events = pump(server, decider)
    out = [server.data_to_send()]
    for chunk in chunks:
        if server.closed:
            break
        if chunk:
            server.receive_data(chunk)
            events += pump(server, decider)
            out.append(server.data_to_send())
    if eof and not server.closed:
        server.receive_data(b"")
        events += pump(server, decider)
        out.append(server.data_to_send())
    return merge_body(events), b"".join(out)


def merge_body(events: list[Event]) -> list[Event]:
    merged: list[Event] = []
    for event in events:
        if isinstance(event, BodyChunk) and merged and isinstance(merged[-1], BodyChunk):
            merged[-1] = BodyChunk(merged[-1].data + event.data)
        else:
            merged.append(event)
    return merged


def replies(wire: bytes) -> list[bytes]:
    """The final lines of each reply in ``wire`` (multi-line replies folded)."""
    return [line for line in wire.split(b"\r\n") if line and line[3:4] != b"-"]


def split_at(data: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def converse(
    client: ClientConnection,
    server: ServerConnection,
    decider: Decider = decide,
    chunk: int = 1 << 20,
    events: list[Event] | None = None,
) -> ClientEvent:
    """Run the client's current step against the server in memory.

    ``chunk`` bounds every transfer, to exercise partial reads on both sides;
    the server's events are appended to ``events`` when given.
    """
    seen = [] if events is None else events
    for _ in range(100_000):
        event = client.next_event()
        if event is not NEED_DATA:
            return event
        outgoing = client.data_to_send()
        for i in range(0, len(outgoing), chunk):
            server.receive_data(outgoing[i : i + chunk])
            seen += pump(server, decider)
        incoming = server.data_to_send()
        if not incoming and server.closed:
            client.receive_data(b"")
        for i in range(0, len(incoming), chunk):
            client.receive_data(incoming[i : i + chunk])
    raise AssertionError("conversation did not finish")


# ------------------------------------------------------------------ strategies
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
labels = st.text(_LETTERS, min_size=1, max_size=10) | st.builds(
    lambda a, b, c: a + b + c,
    st.text(_LETTERS, min_size=1, max_size=4),
    st.text(_LETTERS + "-", min_size=0, max_size=4),
    st.text(_LETTERS, min_size=1, max_size=4),
)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join) | st.sampled_from(
    ["[127.0.0.1]", "[IPv6:::1]", "[IPv6:2001:db8::1]", "Example.COM", "bücher.example"]
)
_SAFE_TEXT = st.characters(blacklist_categories=("Cs", "Cc"))
local_parts = st.text(_SAFE_TEXT, min_size=1, max_size=20) | st.from_regex(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\.[A-Za-z0-9_-]{1,5}){0,2}", fullmatch=True
)
paths = st.builds(Path, local_parts, domains)
words = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)
free_text = st.lists(words, min_size=1, max_size=4).map(" ".join)
mail_params = st.builds(
    MailParams,
    size=st.none() | st.integers(0, 10**20 - 1),
    body=st.sampled_from([None, "7BIT", "8BITMIME", "BINARYMIME"]),
    smtputf8=st.booleans(),
    auth=st.none() | st.just("<>") | st.text(_SAFE_TEXT, min_size=1, max_size=30),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    envid=st.none()
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=30),
)
notify = (
    st.none()
    | st.just(("NEVER",))
    | st.lists(st.sampled_from(NOTIFY_ORDER), min_size=1, unique=True).map(
        lambda words: tuple(w for w in NOTIFY_ORDER if w in words)
    )
)
rcpt_params = st.builds(
    RcptParams, notify=notify, orcpt=st.none() | st.text(_SAFE_TEXT, min_size=1, max_size=40)
)


def _fits(cmd: Command) -> bool:
    try:
        line = format_command(cmd)
    except Exception:
        return False
    return len(line) <= max_line_length(line)


commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(Ehlo, words),
    st.builds(Helo, words),
    st.builds(Mail, paths | st.just(Path("", "")), mail_params),
    st.builds(
        Rcpt, paths | st.just(Path("postmaster", "")) | st.just(Path("PostMaster", "")), rcpt_params
    ),
    st.just(Data()),
    st.builds(Bdat, st.integers(0, 10**18 - 1), st.booleans()),
    st.just(Rset()),
    st.builds(Noop, st.just("") | free_text),
    st.just(Quit()),
    st.builds(Vrfy, free_text),
    st.builds(Help, st.just("") | free_text),
    st.just(StartTls()),
    st.builds(
        Auth,
        st.from_regex(r"[A-Z0-9_-]{1,20}", fullmatch=True),
        st.none() | st.from_regex(r"[A-Za-z0-9+/]{1,60}={0,2}", fullmatch=True),
    ),
).filter(_fits)

COMMAND_LINES = [
    b"EHLO c.test\r\n",
    b"HELO c.test\r\n",
    b"MAIL FROM:<a@b.test>\r\n",
    b"MAIL FROM:<bad@b.test>\r\n",
    b"MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME\r\n",
    b"RCPT TO:<x@y.test>\r\n",
    b"RCPT TO:<bad@y.test>\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"BDAT 3 LAST\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"VRFY x\r\n",
    b"HELP\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH PLAIN AGEAc2VjcmV0\r\n",
    b"dXNlcg==\r\n",
    b"c2VjcmV0\r\n",
    b"*\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r.\r",
    b"hello\r\n",
    b"..x\r\n",
    b"\x00\xff",
    b"MAIL FROM:<\xc3\xa9@x>\r\n",
    b"X" * 600,
]
wire_bytes = st.lists(st.sampled_from(COMMAND_LINES) | st.binary(max_size=12), max_size=30).map(
    b"".join
)
