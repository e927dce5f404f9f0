#!/usr/bin/env python3
"""atheris harness for what a hostile next hop answers: SMTP and LMTP replies.

Input: byte 0 picks where to split the stream, byte 1 the conversation
(bit 0 LMTP, bits 1-2 one to four recipients, bit 3 AUTH, bit 4 LOGIN
instead of PLAIN, bit 5 a second transaction, bit 6 a non-ASCII body and
sender, bit 7 DSN parameters); the rest is every byte the server sends.

Oracle, on ``ReplyParser`` alone: a small reference parser written from RFC
5321 §4.2 (lines end in LF, CR LF tolerated; a three-digit code 200..599;
"-" continues, SP or nothing ends; one code throughout a multi-line reply; a
bare CR is garbage) and RFC 3463 §2 (a leading enhanced code of the reply's
class is taken off each line, the first one is the reply's) gives the same
replies, or refuses where the parser raises ``ReplyError``; fed the stream in
two pieces, the parser reports after the first piece exactly the replies that
are complete in it (no partial reply is ever reported) and in the end the same
replies as fed whole; every reply ``Reply.format``s back into bytes that parse
to the same reply; the EHLO capability parse never raises on any of them.

Oracle, on the sans-IO ``ClientConnection`` driven through greeting, EHLO or
LHLO, [AUTH], MAIL, RCPT x n, DATA, the data, [a second transaction], QUIT:
only ``ReplyError`` escapes; events, the bytes sent and the error do not
depend on the split; every reply in an event is a reply the reference parser
found complete by then (or one of the documented local refusals); a
transaction result has one RCPT reply per recipient and, in LMTP after the
data, one reply per accepted recipient (None for the others); capabilities
are upper-case keywords with stripped parameters and ``max_size`` is None or
positive; and the LMTP agent turns every outcome into an Outcome whose kind
and status class follow the reply code.

    python fuzz/fuzz_replies.py fuzz/corpus-replies fuzz/seeds/replies
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import atheris

with atheris.instrument_imports():
    from trio_mta.smtp import (
        NEED_DATA,
        AuthResult,
        ClientConnection,
        ClientEvent,
        CommandResult,
        DsnRequest,
        Greeting,
        HelloResult,
        RcptParams,
        Reply,
        ReplyError,
        ReplyParser,
        TransactionResult,
    )
    from trio_mta.smtp.client import _parse_extensions

# Not instrumented: it pulls in trio and the client on sockets, whose coverage
# would only dilute the feedback; the two pure helpers used are small.
from trio_mta.delivery.lmtp import LMTPAgent, _stages

_DIGITS = frozenset("0123456789")
#: Replies the client makes up itself instead of sending (client.py `_mail_step`).
_LOCAL = ((553, "5.6.7"), (552, "5.3.4"))
_STATUS_CLASS = {"delivered": "2", "deferred": "4", "failed": "5"}
_AGENT = LMTPAgent("127.0.0.1:24", "fuzz.example")


class _Refused(Exception):
    """The reference parser's verdict: this is not an SMTP reply stream."""


def _status(text: str, code: int) -> tuple[str | None, str]:
    """RFC 3463 §2: (enhanced code, rest of the line) if the line starts with one of the class."""
    head, _, rest = text.partition(" ")
    parts = head.split(".")
    if (
        len(parts) == 3
        and parts[0] == str(code)[0]
        and all(1 <= len(p) <= 3 and set(p) <= _DIGITS for p in parts[1:])
    ):
        return head, rest
    return None, text


def _reference(stream: bytes) -> tuple[list[Reply], bool]:
    """Replies complete in ``stream``, and whether a complete line was refused."""
    replies: list[Reply] = []
    pending: list[tuple[int, str]] = []
    *lines, _partial = stream.split(b"\n")
    try:
        for raw in lines:
            if raw[-1:] == b"\r":
                raw = raw[:-1]
            if b"\r" in raw or len(raw) < 3 or raw[3:4] not in (b"", b" ", b"-"):
                raise _Refused
            if not all(48 <= b <= 57 for b in raw[:3]):
                raise _Refused
            code = int(raw[:3])
            if not 200 <= code <= 599 or (pending and pending[0][0] != code):
                raise _Refused
            pending.append((code, raw[4:].decode("utf-8", "replace")))
            if len(pending) > 1000:
                raise _Refused
            if raw[3:4] != b"-":
                status: str | None = None
                texts = []
                for _, text in pending:
                    found, text = _status(text, code)
                    status = status or found
                    texts.append(text)
                replies.append(Reply(code, status, tuple(texts)))
                pending = []
    except _Refused:
        return replies, True
    return replies, False


def _drain(parser: ReplyParser, into: list[Reply]) -> bool:
    """Take every complete reply out of ``parser``; True when it raised ReplyError."""
    while True:
        try:
            reply = parser.next_reply()
        except ReplyError:
            return True
        if reply is None:
            return False
        into.append(reply)


def _check_reply(reply: Reply, where: bytes) -> None:
    if not 200 <= reply.code <= 599:
        raise AssertionError(f"{where!r}: reply code {reply.code}")
    if reply.status is not None and reply.status[0] != str(reply.code)[0]:
        raise AssertionError(f"{where!r}: status {reply.status} in a {reply.code} reply")
    if not reply.lines or any("\r" in line or "\n" in line for line in reply.lines):
        raise AssertionError(f"{where!r}: reply lines {reply.lines!r}")
    again = ReplyParser()
    wire = reply.format()
    again.feed(wire)
    if again.next_reply() != reply or again.buffered:
        raise AssertionError(f"{where!r}: {reply!r} formats as {wire!r}, which parses otherwise")
    _check_extensions(_parse_extensions(reply), where)


def _check_extensions(extensions: dict[str, str], where: bytes) -> None:
    for keyword, params in extensions.items():
        if not keyword or keyword != keyword.upper() or keyword.split() != [keyword]:
            raise AssertionError(f"{where!r}: EHLO keyword {keyword!r}")
        if params != params.strip():
            raise AssertionError(f"{where!r}: EHLO parameters {params!r}")


def _check_parser(stream: bytes, cut: int) -> tuple[list[Reply], list[Reply]]:
    """The parser against the reference; returns the reference for the first piece and all."""
    expected, refused = _reference(stream)
    whole: list[Reply] = []
    parser = ReplyParser()
    parser.feed(stream)
    raised = _drain(parser, whole)
    if (whole, raised) != (expected, refused):
        raise AssertionError(f"{stream!r}: parsed {whole!r} {raised}, expected {expected!r}")
    head, head_refused = _reference(stream[:cut])
    split: list[Reply] = []
    parser = ReplyParser()
    parser.feed(stream[:cut])
    raised = _drain(parser, split)
    if (split, raised) != (head, head_refused):
        raise AssertionError(f"{stream!r}: first {cut} bytes parsed as {split!r}, not {head!r}")
    if not raised:
        parser.feed(stream[cut:])
        raised = _drain(parser, split)
        if (split, raised) != (expected, refused):
            raise AssertionError(f"{stream!r}: split at {cut} parses as {split!r}")
    for reply in expected:
        _check_reply(reply, stream)
    return head, expected


def _replies_of(event: ClientEvent) -> Iterator[Reply]:
    if isinstance(event, TransactionResult):
        yield event.mail_reply
        yield from (r for r in event.rcpt_replies if r is not None)
        if event.data_reply is not None:
            yield event.data_reply
        yield from (r for r in event.data_replies if r is not None)
    else:
        yield event.reply


def _check_transaction(result: TransactionResult, count: int, lmtp: bool, where: bytes) -> None:
    if len(result.rcpt_replies) != count or len(result.outcomes) != count:
        raise AssertionError(f"{where!r}: {result!r} for {count} recipients")
    accepted = [r is not None and r.is_success for r in result.rcpt_replies]
    if result.data_replies:
        if not lmtp or len(result.data_replies) != count:
            raise AssertionError(f"{where!r}: data replies {result!r}")
        if [r is not None for r in result.data_replies] != accepted:
            raise AssertionError(f"{where!r}: data replies for refused recipients {result!r}")
    stages = _stages(result)
    if len(stages) != count:
        raise AssertionError(f"{where!r}: stages {stages!r}")
    for reply, stage in zip(result.outcomes, stages, strict=True):
        outcome = _AGENT._outcome(reply, "127.0.0.1", stage)
        kind = "delivered" if reply.is_success else "failed" if reply.code >= 500 else "deferred"
        if outcome.kind != kind or outcome.status[0] != _STATUS_CLASS[kind]:
            raise AssertionError(f"{where!r}: {reply!r} became {outcome!r}")


class _Conversation:
    """Drives one ClientConnection over the given pieces of server bytes (then EOF)."""

    def __init__(self, pieces: list[bytes], config: int) -> None:
        self.pieces = [*(p for p in pieces if p), b""]  # b"" is EOF, so only at the end
        self.fed = 0
        self.fed_bytes = 0
        self.lmtp = bool(config & 1)
        self.conn = ClientConnection(helo_name="client.example", lmtp=self.lmtp)
        self.events: list[ClientEvent] = []
        self.fed_at: list[int] = []  # bytes fed when each event came out
        self.sent = bytearray()

    def step(self) -> ClientEvent:
        while True:
            event = self.conn.next_event()
            self.sent += self.conn.data_to_send()
            if event is not NEED_DATA:
                self.events.append(event)
                self.fed_at.append(self.fed_bytes)
                return event
            self.conn.receive_data(self.pieces[self.fed])
            self.fed_bytes += len(self.pieces[self.fed])
            self.fed += 1


def _converse(pieces: list[bytes], config: int) -> tuple[_Conversation, str | None]:
    talk = _Conversation(pieces, config)
    conn = talk.conn
    count = (config >> 1 & 3) + 1
    eight_bit = bool(config & 64)
    sender = "sénder@example.org" if eight_bit else "sender@example.org"
    body = b"Subject: x\r\n\r\n" + (b"caf\xc3\xa9\r\n.\r\n" if eight_bit else b"hi\r\n.\r\n")
    recipients = [f"rcpt{i}@example.net" for i in range(count)]
    dsn = (
        DsnRequest(tuple(RcptParams(notify=("FAILURE",)) for _ in recipients), envid="e1")
        if config & 128
        else None
    )
    try:
        talk.step()
        if conn.closed:
            return talk, None
        conn.ehlo()
        talk.step()
        _check_extensions(conn.extensions, b"".join(pieces))
        limit = conn.max_size
        if limit is not None and limit <= 0:
            raise AssertionError(f"max_size {limit}")
        sorted(conn.auth_mechanisms)
        if config & 8 and not conn.closed:
            conn.authenticate("LOGIN" if config & 16 else "PLAIN", "user", "pass")
            talk.step()
        for _ in range(2 if config & 32 else 1):
            if conn.closed:
                return talk, None
            conn.send_mail(sender, recipients, body, dsn=dsn)
            result = talk.step()
            assert isinstance(result, TransactionResult)
            _check_transaction(result, count, talk.lmtp, b"".join(pieces))
        if not conn.closed:
            conn.quit()
            talk.step()
    except ReplyError as exc:
        # What was queued before the error counts as sent: whether the loop got to
        # send it first depends on the split, not on what the server said.
        talk.sent += conn.data_to_send()
        return talk, str(exc)
    return talk, None


def _is_local(reply: Reply) -> bool:
    return (reply.code, reply.status) in _LOCAL and reply.text.startswith(
        ("Server does not support SMTPUTF8", "Message too big for the server")
    )


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    stream = data[2:]
    cut = data[0] % (len(stream) + 1)
    config = data[1]
    head, complete = _check_parser(stream, cut)
    whole, whole_error = _converse([stream], config)
    split, split_error = _converse([stream[:cut], stream[cut:]], config)
    if (whole.events, bytes(whole.sent), whole_error) != (
        split.events,
        bytes(split.sent),
        split_error,
    ):
        raise AssertionError(
            f"{data!r}: whole {whole.events!r} {whole_error!r}, "
            f"split at {cut} {split.events!r} {split_error!r}"
        )
    # What the reference found complete in the bytes fed so far (0, cut or all of them).
    known = {0: set(), cut: set(head), len(stream): set(complete)}
    for event, fed in zip(split.events, split.fed_at, strict=True):
        if not isinstance(
            event, (Greeting, HelloResult, AuthResult, TransactionResult, CommandResult)
        ):
            raise AssertionError(f"{data!r}: unexpected event {event!r}")
        for reply in _replies_of(event):
            if _is_local(reply):
                continue
            if reply not in known[fed]:
                raise AssertionError(f"{data!r}: {event!r} holds a reply never completed")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
