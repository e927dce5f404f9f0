"""trio_mta.testing.strategies generate only valid data, checked against independent code.

Every example goes through code we did not write: smtplib sends it to
``smtp_capture`` (our server) and to aiosmtpd (a real peer, its own parser),
Python's ``email`` parses it without defects, dnspython takes the domains, and
trio_mta's parser accepts it too. A strategy that produced something invalid
would fail here, not in a user's property test.

Examples per test: ``EXAMPLES`` (300) in the everyday suite, so each test
takes seconds; under the fuzz profile (``-p fuzz.hypothesis_long``, see
fuzz/README.md) the profile's count applies instead, for the long run.
"""

from __future__ import annotations

import email
import email.errors
import email.policy
import re
import smtplib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import dns.name
import pytest
from aiosmtpd.controller import Controller
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_mta.smtp import CommandError, Mail, Rcpt, parse_command, parse_path
from trio_mta.testing import SMTPCapture
from trio_mta.testing.strategies import (
    COMMAND_VERBS,
    addresses,
    commands,
    domains,
    messages,
)

EXAMPLES = max(300, settings.default.max_examples)
# Messages cost ~10 ms each to draw and parse with email.policy.default, and more
# over two SMTP sessions: fewer of them in the everyday run keeps each test to
# seconds on a loaded CI machine; the fuzz profile runs them by the thousand.
MESSAGE_EXAMPLES = max(100, settings.default.max_examples)
# Live tests share one server per module; hypothesis would flag the module fixture.
live = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
offline = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
live_messages = settings(live, max_examples=MESSAGE_EXAMPLES)
offline_messages = settings(offline, max_examples=MESSAGE_EXAMPLES)

LDH_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\Z")
BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# Replies that mean "I did not understand that line" rather than a policy decision.
SYNTAX_ERRORS = {500, 501, 502, 504, 555}
# Python's email package predates RFC 6532 and flags UTF-8 local parts in bytes input.
RFC6532_DEFECTS = (email.errors.NonASCIILocalPartDefect, email.errors.UndecodableBytesDefect)


ALL_VERBS = [*COMMAND_VERBS, "DATA", "QUIT", "STARTTLS"]


def either(
    narrow: st.SearchStrategy[Any], wide: st.SearchStrategy[Any]
) -> st.SearchStrategy[tuple[bool, Any]]:
    """(False, ASCII example) or (True, SMTPUTF8 example); built once, not per example
    as a flatmap would (rebuilding the strategies cost 80 % of the run time)."""
    return st.tuples(st.just(False), narrow) | st.tuples(st.just(True), wide)


def path_of(address: str, *, smtputf8: bool) -> Any:
    return parse_path(f"<{address}>", smtputf8=smtputf8, allow_null=False)


# ---------------------------------------------------------------- peers


class _Keep:
    """aiosmtpd handler keeping (mail_from, rcpt_tos, content)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as probe:  # aiosmtpd 1.4 cannot bind port 0 itself
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def aiosmtpd_peer() -> Iterator[tuple[int, _Keep]]:
    keep = _Keep()
    port = _free_port()
    controller = Controller(
        keep,
        hostname="127.0.0.1",
        port=port,
        enable_SMTPUTF8=True,
        data_size_limit=10**8,
        ready_timeout=10,
    )
    controller.start()
    try:
        yield port, keep
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def capture() -> Iterator[SMTPCapture]:
    with SMTPCapture() as cap:
        yield cap


def send(
    port: int, sender: str, rcpts: list[str], data: bytes, *, utf8: bool, eight_bit: bool
) -> None:
    options = (["SMTPUTF8"] if utf8 else []) + (["BODY=8BITMIME"] if eight_bit else [])
    # local_hostname: smtplib would otherwise ask DNS for this machine's FQDN every time.
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        assert client.sendmail(sender, rcpts, data, mail_options=options) == {}


# ---------------------------------------------------------------- domains


@offline
@given(domains())
def test_domains_are_ldh_names_that_fit_dns(domain: str) -> None:
    labels = domain.split(".")
    assert all(LDH_LABEL.match(label) and len(label) <= 63 for label in labels)
    assert len(domain) <= 253 and any(c.isalpha() for c in labels[-1])
    name = dns.name.from_text(domain)  # independent: raises on bad lengths
    assert name.to_text(omit_final_dot=True).lower() == domain.lower()
    assert path_of(f"postmaster@{domain}", smtputf8=False).domain == domain
    assert parse_command(f"EHLO {domain}".encode()) is not None


# ---------------------------------------------------------------- addresses


@offline
@given(either(addresses(), addresses(smtputf8=True)))
def test_addresses_parse_in_email_and_our_parser(case: tuple[bool, str]) -> None:
    utf8, address = case
    path = path_of(address, smtputf8=utf8)
    assert f"{path.local_part}" and path.domain == address.rsplit("@", 1)[1]
    assert len(f"<{address}>".encode()) <= 256
    if not address.isascii():
        with pytest.raises(CommandError):
            path_of(address, smtputf8=False)
    header = email.message_from_bytes(
        f"To: {address}\r\n\r\n".encode(), policy=email.policy.default
    )["To"]
    defects = [d for d in header.defects if not (utf8 and isinstance(d, RFC6532_DEFECTS))]
    assert defects == []
    (parsed,) = header.addresses
    assert parsed.domain == path.domain


@live
@given(addresses(), addresses(smtputf8=True), st.lists(addresses(), min_size=1, max_size=3))
def test_addresses_travel_through_smtplib_to_both_servers(
    capture: SMTPCapture,
    aiosmtpd_peer: tuple[int, _Keep],
    sender: str,
    utf8_rcpt: str,
    rcpts: list[str],
) -> None:
    port, keep = aiosmtpd_peer
    everyone = [*rcpts, utf8_rcpt]
    utf8 = not utf8_rcpt.isascii()
    capture.clear()
    send(capture.port, sender, everyone, b"Subject: a\r\n\r\n", utf8=utf8, eight_bit=False)
    (got,) = capture.messages
    # smtplib may re-quote (e.g. "\ " as " "): the same mailbox is what must arrive.
    assert path_of(got.sender, smtputf8=True) == path_of(sender, smtputf8=True)
    assert [path_of(r, smtputf8=True) for r in got.recipients] == [
        path_of(r, smtputf8=True) for r in everyone
    ]
    before = len(keep.got)
    send(port, sender, everyone, b"Subject: a\r\n\r\n", utf8=utf8, eight_bit=False)
    # aiosmtpd accepted every address (send() checks each reply). Its envelope is not
    # compared: it rebuilds addresses through email's parser, which drops needed quotes
    # ('"."@x' becomes '.@x').
    assert len(keep.got[before][1]) == len(everyone)


# ---------------------------------------------------------------- messages


def check_message(data: bytes, *, utf8: bool) -> None:
    assert BARE_LINE_END.search(data) is None and data.endswith(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed.defects == []
    for name, value in parsed.items():
        defects = [
            d
            for d in value.defects
            if not (utf8 and name in ("From", "To") and isinstance(d, RFC6532_DEFECTS))
        ]
        assert defects == [], (name, value)
    assert parsed["From"] is not None and parsed["Date"] is not None
    assert parsed["Date"].datetime is not None
    if parsed.get_content_maintype() == "text":
        parsed.get_content()  # decodes (8bit bodies are UTF-8 as declared)


@offline_messages
@given(messages())
def test_messages_parse_without_defects(data: bytes) -> None:
    assert data.isascii()
    check_message(data, utf8=False)


@offline_messages
@given(messages(eight_bit=True, smtputf8=True))
def test_8bit_and_utf8_messages_parse_without_defects(data: bytes) -> None:
    check_message(data, utf8=True)
    data.decode("utf-8")


@live_messages
@given(either(messages(), messages(eight_bit=True, smtputf8=True)))
def test_messages_arrive_byte_for_byte_at_both_servers(
    capture: SMTPCapture, aiosmtpd_peer: tuple[int, _Keep], case: tuple[bool, bytes]
) -> None:
    wide, data = case
    port, keep = aiosmtpd_peer
    capture.clear()
    send(capture.port, "a@example.test", ["b@example.test"], data, utf8=wide, eight_bit=wide)
    (got,) = capture.messages
    assert got.data == data
    before = len(keep.got)
    send(port, "a@example.test", ["b@example.test"], data, utf8=wide, eight_bit=wide)
    assert keep.got[before][2] == data


# ---------------------------------------------------------------- commands


@offline
@given(either(commands(verbs=ALL_VERBS), commands(verbs=ALL_VERBS, smtputf8=True)))
def test_commands_parse_in_our_parser(case: tuple[bool, bytes]) -> None:
    utf8, line = case
    assert line.endswith(b"\r\n") and len(line) <= 512
    assert BARE_LINE_END.search(line) is None
    command = parse_command(line[:-2], smtputf8_ok=utf8)
    if isinstance(command, Mail) and not line.isascii():
        assert command.params.smtputf8
    if not utf8:
        assert line.isascii() or isinstance(command, Rcpt | Mail)


def converse(port: int, lines: list[bytes]) -> list[tuple[bytes, int]]:
    """Send EHLO, then each line, reading each reply; (line, code) pairs."""
    codes = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for line in [b"", b"EHLO client.test\r\n", *lines]:
            if line:
                sock.sendall(line)
            while True:
                reply = reader.readline()
                assert reply, f"connection closed after {line!r}"
                if reply[3:4] != b"-":
                    break
            codes.append((line, int(reply[:3])))
    return codes[2:]


@live
@given(st.lists(commands(verbs=[v for v in COMMAND_VERBS if v != "HELO"]), min_size=1, max_size=8))
def test_command_sequences_are_understood_by_both_servers(
    capture: SMTPCapture, aiosmtpd_peer: tuple[int, _Keep], lines: list[bytes]
) -> None:
    """Any sequence of generated commands after EHLO: replies may refuse (503 bad
    sequence, 552 too big) but never say the syntax was wrong. HELO is left out: after
    it, MAIL parameters such as SIZE= are rightly refused (555, no ESMTP session)."""
    for port in (capture.port, aiosmtpd_peer[0]):
        misunderstood = [
            (line, code) for line, code in converse(port, lines) if code in SYNTAX_ERRORS
        ]
        assert misunderstood == [], port
