"""Random server conversations against a reference model (hypothesis stateful testing).

Rules queue command lines (pipelined, RFC 2920) together with the reply the
model of RFC 5321/3030/3207 predicts for each; ``flush`` sends the queue to a
:class:`ServerConnection` split at random points and compares. Invariants hold
after every step: one reply per command, in order, each as predicted; never
more accepted messages than end markers sent; nothing buffered after STARTTLS;
the machine stays usable after every error (only QUIT closes it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_mta.smtp import (
    NEED_DATA,
    ConnectionClosed,
    EndOfMessage,
    Event,
    MailFrom,
    MessageRefused,
    Quit,
    RcptTo,
    Reply,
    ServerConnection,
    StartTlsRequest,
)
from trio_mta.smtp.commands import max_line_length
from trio_mta.smtp.server import MAX_PENDING_PLAINTEXT

from .smtp_helpers import BANNER, merge_body, replies, split_at

MAX_SIZE = 2000
MAX_RCPT = 3


def bare(data: bytes) -> bool:
    """Reference rule, independent of the code under test: a CR or LF outside a CRLF."""
    rest = data.replace(b"\r\n", b"")
    return b"\r" in rest or b"\n" in rest


@dataclass
class Model:
    """What the server must believe; updated as each command is queued."""

    greeted: bool = False
    esmtp: bool = False
    tls: bool = False
    mail: bool = False
    rcpts: int = 0
    bdat: bytes | None = None  # content of the open BDAT message
    expected: list[bytes] = field(default_factory=list)  # reply line prefixes, in order

    def reset(self) -> None:
        self.mail, self.rcpts, self.bdat = False, 0, None


class Conversation(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.start()
        self.end_markers = 0  # DATA ends and BDAT LAST sent so far
        self.accepted = 0  # EndOfMessage events
        self.refused = 0  # MessageRefused events
        self.predicted_accepted = 0

    def start(self) -> None:
        self.server = ServerConnection(
            hostname="mx.test",
            max_message_size=MAX_SIZE,
            max_recipients=MAX_RCPT,
            starttls=True,
            max_errors=10**6,
        )
        self.server.send_reply(BANNER)
        assert self.server.data_to_send() == BANNER.format()
        self.model = Model()
        self.wire = b""
        self.answered = 0
        self.tls_answers: deque[Reply] = deque()  # for the STARTTLS decisions queued

    # --------------------------------------------------------------- plumbing
    def queue(self, data: bytes, *expected: bytes) -> None:
        self.wire += data
        self.model.expected += expected

    def decide(self, event: Event) -> Reply:
        if isinstance(event, MailFrom):
            ok = not event.path.local_part.startswith("bad")
            return Reply(250, "2.1.0", "Ok") if ok else Reply(550, "5.7.1", "Refused")
        if isinstance(event, RcptTo):
            ok = not event.path.local_part.startswith("bad")
            return Reply(250, "2.1.5", "Ok") if ok else Reply(550, "5.1.1", "No such user")
        if isinstance(event, EndOfMessage):
            return Reply(250, "2.0.0", "Ok: queued")
        if isinstance(event, StartTlsRequest):
            return self.tls_answers.popleft()
        raise AssertionError(f"unexpected decision {event!r}")

    def pump(self) -> list[Event]:
        events: list[Event] = []
        while (event := self.server.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, ConnectionClosed):
                break
            if isinstance(event, (MailFrom, RcptTo, EndOfMessage, StartTlsRequest)):
                self.server.send_reply(self.decide(event))
        return events

    def send(self, cuts: list[int]) -> tuple[list[Event], list[bytes]]:
        """Feed the queued wire in pieces; every reply must be one the model predicted."""
        events: list[Event] = []
        out = b""
        for chunk in split_at(self.wire, cuts):
            if chunk and not self.server.closed:
                self.server.receive_data(chunk)
                events += self.pump()
                out += self.server.data_to_send()
        self.wire = b""
        lines = replies(out)
        expected = self.model.expected[self.answered :]
        assert len(lines) == len(expected), (lines, expected)
        for line, prefix in zip(lines, expected, strict=True):
            assert line.startswith(prefix), (line, prefix)
        self.answered += len(lines)
        self.accepted += sum(isinstance(e, EndOfMessage) for e in events)
        self.refused += sum(isinstance(e, MessageRefused) for e in events)
        return merge_body(events), lines

    # ------------------------------------------------------------------ rules
    @rule(name=st.sampled_from([b"c.test", b"[127.0.0.1]", b"my_pc"]), esmtp=st.booleans())
    def hello(self, name: bytes, esmtp: bool) -> None:
        self.queue((b"EHLO " if esmtp else b"HELO ") + name + b"\r\n", b"250 ")
        self.model.reset()
        self.model.greeted, self.model.esmtp = True, esmtp

    @rule(
        local=st.sampled_from([b"a", b"bad"]),
        size=st.sampled_from([None, 10, MAX_SIZE, MAX_SIZE + 1]),
    )
    def mail(self, local: bytes, size: int | None) -> None:
        line = b"MAIL FROM:<" + local + b"@b.test>"
        if size is not None:
            line += b" SIZE=%d" % size
        m = self.model
        if not m.greeted:
            self.queue(line + b"\r\n", b"503 5.5.1 Error: send HELO")
        elif m.mail:
            self.queue(line + b"\r\n", b"503 5.5.1 Error: nested")
        elif size is not None and not m.esmtp:
            self.queue(line + b"\r\n", b"555 5.5.4")
        elif size is not None and size > MAX_SIZE:
            self.queue(line + b"\r\n", b"552 5.3.4")
        elif local == b"bad":
            self.queue(line + b"\r\n", b"550 5.7.1")
        else:
            self.queue(line + b"\r\n", b"250 2.1.0")
            m.mail = True

    @rule(local=st.sampled_from([b"x", b"bad"]))
    def rcpt(self, local: bytes) -> None:
        line = b"RCPT TO:<" + local + b"@y.test>\r\n"
        m = self.model
        if not m.mail:
            self.queue(line, b"503 5.5.1 Error: need MAIL")
        elif m.bdat is not None:
            self.queue(line, b"503 5.5.1 Error: BDAT")
        elif m.rcpts >= MAX_RCPT:
            self.queue(line, b"452 4.5.3")
        elif local == b"bad":
            self.queue(line, b"550 5.1.1")
        else:
            self.queue(line, b"250 2.1.5")
            m.rcpts += 1

    @rule(
        lines=st.lists(
            st.sampled_from(
                [
                    b"Subject: x",
                    b"",
                    b".",
                    b"..",
                    b".x",
                    b"hello",
                    b"MAIL FROM:<evil@x.test>",
                    b"QUIT",
                    b"y" * 700,
                ]
            ),
            max_size=6,
        ),
        smuggle=st.none()
        | st.tuples(
            st.integers(0, 5),
            st.sampled_from([b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n", b"\r"]),
        ),
    )
    def data(self, lines: list[bytes], smuggle: tuple[int, bytes] | None) -> None:
        m = self.model
        if not m.mail:
            self.queue(b"DATA\r\n", b"503 5.5.1 Error: need MAIL")
            return
        if m.bdat is not None:
            self.queue(b"DATA\r\n", b"503 5.5.1 Error: BDAT")
            return
        if not m.rcpts:
            self.queue(b"DATA\r\n", b"554 5.5.1")
            return
        if smuggle is not None and lines:
            i = smuggle[0] % len(lines)
            lines[i] = lines[i][:1] + smuggle[1] + lines[i][1:]
        content = b"".join(line + b"\r\n" for line in lines)
        stuffed = b"".join(
            (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines
        )
        assert b"\r\n.\r\n" not in b"\r\n" + stuffed
        if bare(stuffed):
            final = b"550 5.5.2"
        elif len(content) > MAX_SIZE:
            final = b"552 5.3.4"
        else:
            final = b"250 2.0.0"
            self.predicted_accepted += 1
        self.queue(b"DATA\r\n" + stuffed + b".\r\n", b"354 ", final)
        self.end_markers += 1
        m.reset()

    @rule(
        content=st.binary(max_size=60)
        | st.sampled_from([b"\r\n.\r\nMAIL FROM:<evil@x.test>\r\n", b"a\r", b"\nb", b"y" * 1500]),
        last=st.booleans(),
    )
    def bdat(self, content: bytes, last: bool) -> None:
        m = self.model
        head = b"BDAT %d%s\r\n" % (len(content), b" LAST" if last else b"")
        if not m.mail:
            self.queue(head + content, b"503 5.5.1 Error: need MAIL")
            return
        if m.bdat is None and not m.rcpts:
            self.queue(head + content, b"554 5.5.1")
            return
        m.bdat = (m.bdat or b"") + content
        if not last:
            self.queue(head + content, b"250 2.0.0 %d octets" % len(content))
            return
        self.end_markers += 1
        if bare(m.bdat):
            self.queue(head + content, b"550 5.5.2")
        elif len(m.bdat) > MAX_SIZE:
            self.queue(head + content, b"552 5.3.4")
        else:
            self.queue(head + content, b"250 2.0.0 Ok")
            self.predicted_accepted += 1
        m.reset()

    @rule()
    def rset(self) -> None:
        self.queue(b"RSET\r\n", b"250 2.0.0")
        self.model.reset()

    @rule(arg=st.sampled_from([b"", b" hello", b" " + b"n" * 505, b" " + b"n" * 506]))
    def noop(self, arg: bytes) -> None:
        line = b"NOOP" + arg + b"\r\n"
        self.queue(line, b"250 2.0.0" if len(line) <= 512 else b"500 5.5.2 Line too long")

    @rule(
        junk=st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
        ending=st.sampled_from([b"\r\n", b"\n"]),
    )
    def garbage(self, junk: bytes, ending: bytes) -> None:
        line = b"X" + junk + ending
        if bare(line[:-2] if line.endswith(b"\r\n") else line):
            self.queue(line, b"500 5.5.2 Bare CR or LF")
        else:
            self.queue(line, b"500 5.5.1 Command unrecognized")

    @rule(
        verb=st.sampled_from([b"X", b"NOOP ", b"RCPT TO:<", b"MAIL FROM:<"]),
        size=st.sampled_from([513, 600, 1039, 1040, 1500, 3000]),
        stray=st.lists(
            st.tuples(st.integers(0, 3000), st.sampled_from([b"\r", b"\x00"])), max_size=3
        ),
        ending=st.sampled_from([b"\r\n", b"\n"]),
    )
    def overlong(
        self, verb: bytes, size: int, stray: list[tuple[int, bytes]], ending: bytes
    ) -> None:
        """Over the verb's limit, whatever else is wrong with it: 'Line too long'."""
        limit = max_line_length(verb)
        if size <= limit:
            size += limit
        line = bytearray(verb + b"a" * (size - len(verb) - len(ending)))
        for where, what in stray:
            at = len(verb) + where % (len(line) - len(verb))
            line[at:at] = what
        self.queue(bytes(line) + ending, b"500 5.5.2 Line too long")

    @rule(cuts=st.lists(st.integers(0, 10_000), max_size=6))
    def flush(self, cuts: list[int]) -> None:
        self.send(cuts)

    @rule(
        accept=st.booleans(),
        trailing=st.sampled_from(
            [
                b"",
                b"RSET\r\n",
                b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 500,
            ]
        ),
        cuts=st.lists(st.integers(0, 10_000), max_size=4),
    )
    def starttls(self, accept: bool, trailing: bytes, cuts: list[int]) -> None:
        m = self.model
        if m.tls:
            self.queue(b"STARTTLS\r\n", b"503 5.5.1 Error: TLS already active")
        elif m.mail:
            self.queue(b"STARTTLS\r\n", b"503 5.5.1 Error: MAIL transaction")
        elif not accept:
            self.tls_answers.append(Reply(454, "4.7.0", "TLS not available"))
            self.queue(b"STARTTLS\r\n", b"454 4.7.0")
        else:
            self.tls_answers.append(Reply(220, "2.0.0", "Go"))
            before = len(self.server.pending_plaintext)
            self.queue(b"STARTTLS\r\n" + trailing, b"220 2.0.0")
            self.send(cuts)
            # RFC 3207 §4: whatever followed STARTTLS is dropped, never answered.
            assert self.server.awaiting_tls
            assert self.server.pending_plaintext == trailing[: MAX_PENDING_PLAINTEXT - before]
            assert self.server.next_event() is NEED_DATA
            self.server.tls_established()
            assert self.server.next_event() is NEED_DATA
            assert self.server.data_to_send() == b""
            assert self.server.tls_active and self.server.helo_name is None
            m.reset()
            m.greeted = m.esmtp = False
            m.tls = True

    @rule(cuts=st.lists(st.integers(0, 10_000), max_size=4), after=st.binary(max_size=20))
    def quit(self, cuts: list[int], after: bytes) -> None:
        self.queue(b"QUIT\r\n" + after, b"221 2.0.0")
        events, _ = self.send(cuts)
        assert events[-2:] == [Quit(), ConnectionClosed()] and self.server.closed
        assert self.server.next_event() == ConnectionClosed()
        self.start()  # the client connects again

    @precondition(lambda self: not self.wire)
    @rule()
    def eof(self) -> None:
        """EOF between commands closes cleanly; nothing half-received is accepted."""
        self.server.receive_data(b"")
        assert self.pump()[-1:] == [ConnectionClosed()]
        assert self.server.closed and self.server.data_to_send() == b""
        self.start()

    # ------------------------------------------------------------- invariants
    @invariant()
    def replies_match_what_was_sent(self) -> None:
        assert self.answered <= len(self.model.expected)
        if not self.wire:
            assert self.answered == len(self.model.expected)

    @invariant()
    def never_more_messages_than_end_markers(self) -> None:
        assert self.accepted + self.refused <= self.end_markers
        assert self.accepted <= self.predicted_accepted

    @invariant()
    def usable_after_errors(self) -> None:
        assert not self.server.closed  # errors never close it (max_errors is huge)
        assert self.server.pending_decision is None

    def teardown(self) -> None:
        if self.wire:
            self.send([])
        assert self.accepted == self.predicted_accepted


# Each example is a conversation of up to 40 steps: 60 % of the profile's examples
# (60 by default, ~7 s of CPU; fuzz/hypothesis_long.py's profile scales it up).
Conversation.TestCase.settings = settings(
    max_examples=max(1, settings.default.max_examples * 3 // 5),
    stateful_step_count=40,
    deadline=None,
)
test_server_conversation = Conversation.TestCase
