"""trio_mta.client against real peers on loopback: aiosmtpd (with trustme TLS) and
byte-exact scripted servers; also home of the peer helpers test_remote.py shares."""

from __future__ import annotations

import functools
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import pytest
import trio
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from trio_mta.client import (
    SMTPAuthError,
    SMTPClient,
    SMTPConnectError,
    SMTPResponseError,
    SMTPSendError,
    SMTPTimeout,
    SMTPTLSError,
    Timeouts,
    send_message,
)

MX1 = "mx1.remote.test"
FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=2, data_end=2)
USER, PASSWORD = "relay-user", "s3cret pass"


# --- peers shared with test_remote.py -------------------------------------------------


def free_port(host: str = "127.0.0.2") -> int:
    """A port free on *host*; the same number is then used on 127.0.0.3, .4 ..."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    peer: Any  # (address, port) of our end: one per connection
    tls: bool
    mail_options: list[str]


@dataclass
class Recorder:
    """aiosmtpd handler that records messages; refusals per recipient or at DATA."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    data_delay: float = 0.0
    messages: list[Received] = field(default_factory=list)
    in_data: int = 0
    max_in_data: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import asyncio

        with self.lock:
            self.in_data += 1
            self.max_in_data = max(self.max_in_data, self.in_data)
        try:
            if self.data_delay:
                await asyncio.sleep(self.data_delay)
        finally:
            with self.lock:
                self.in_data -= 1
        if self.data_reply is not None:
            return self.data_reply
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                session.peer,
                session.ssl is not None,
                list(envelope.mail_options),
            )
        )
        return "250 2.0.0 Ok: queued"

    @property
    def connections(self) -> int:
        return len({m.peer for m in self.messages})


def server_tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd sends the 535


@contextmanager
def aiosmtpd_peer(
    handler: Any, host: str, port: int, *, name: str = MX1, **smtp_kwargs: Any
) -> Iterator[Controller]:
    """aiosmtpd in its own thread on host:port; ``tls_context=`` offers STARTTLS,
    ``ssl_context=`` is implicit TLS."""
    controller = Controller(
        handler, hostname=host, port=port, server_hostname=name, ready_timeout=5, **smtp_kwargs
    )
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


Script = Callable[[trio.SocketStream, list[bytes]], Awaitable[None]]


async def scripted_peer(nursery: trio.Nursery, host: str, script: Script, port: int = 0) -> int:
    """A trio server running *script* per connection; what it read goes in the list."""

    async def handle(stream: trio.SocketStream) -> None:
        seen: list[bytes] = []
        transcripts.append(seen)
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await script(stream, seen)

    transcripts: list[list[bytes]] = []
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, port, host=host))
    bound: int = listeners[0].socket.getsockname()[1]
    return bound


async def read_until(stream: trio.SocketStream, seen: list[bytes], marker: bytes) -> bytes:
    buffer = b""
    while marker not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise trio.BrokenResourceError("peer closed")
        buffer += chunk
    seen.append(buffer)
    return buffer


@dataclass
class BrokenTlsPeer:
    """A scripted peer offering STARTTLS that answers 220 and then sends garbage
    instead of a handshake; a connection that skips STARTTLS gets a plain session."""

    first_commands: list[bytes] = field(default_factory=list)
    delivered: list[bytes] = field(default_factory=list)

    async def __call__(self, stream: trio.SocketStream, seen: list[bytes]) -> None:
        await stream.send_all(b"220 mx ESMTP\r\n")
        await read_until(stream, seen, b"\r\n")
        await stream.send_all(b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
        command = await read_until(stream, seen, b"\r\n")
        self.first_commands.append(command.split(b"\r\n")[0])
        if command.startswith(b"STARTTLS"):
            await stream.send_all(b"220 2.0.0 go ahead\r\n")
            await stream.receive_some(65536)  # the ClientHello
            await stream.send_all(b"this is not TLS\r\n" * 4)
            return
        await stream.send_all(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.delivered.append(await read_until(stream, seen, b"\r\n.\r\n"))
        await stream.send_all(b"250 2.0.0 queued\r\n")
        await read_until(stream, seen, b"QUIT\r\n")
        await stream.send_all(b"221 bye\r\n")


def client_trust(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


# --- connection, TLS, reuse -----------------------------------------------------------


async def test_verified_starttls_and_two_transactions_on_one_connection(ca: trustme.CA) -> None:
    port = free_port()
    handler = Recorder()
    with aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(ca, MX1)):
        client = await SMTPClient.connect(
            "127.0.0.2",
            port,
            helo_name="relay.test",
            tls="verify",
            ssl_context=client_trust(ca),
            server_hostname=MX1,
            timeouts=FAST,
        )
        async with client:
            assert client.tls is not None and client.tls.startswith("TLSv1.")
            assert client.peer == f"{MX1}[127.0.0.2]"
            first = await client.send(
                "a@relay.test", ["b@remote.test"], b"Subject: 1\r\n\r\none\r\n"
            )
            assert (await client.rset()).code == 250
            second = await client.send("", ["c@remote.test"], b"Subject: 2\r\n\r\ntwo\r\n")
    assert [r.code for r in first.outcomes] == [250]
    assert [r.code for r in second.outcomes] == [250]
    assert [m.rcpt_tos for m in handler.messages] == [["b@remote.test"], ["c@remote.test"]]
    assert handler.messages[1].mail_from == "<>"
    assert all(m.tls for m in handler.messages)
    assert handler.connections == 1


async def test_verify_rejects_a_certificate_for_another_name(ca: trustme.CA) -> None:
    port = free_port()
    peer = aiosmtpd_peer(Recorder(), "127.0.0.2", port, tls_context=server_tls(ca, MX1))
    with peer, pytest.raises(SMTPTLSError, match="certificate verification failed"):
        await SMTPClient.connect(
            "127.0.0.2",
            port,
            helo_name="relay.test",
            tls="verify",
            ssl_context=client_trust(ca),
            server_hostname="other.remote.test",
            timeouts=FAST,
        )


async def test_required_refuses_a_server_without_starttls() -> None:
    port = free_port()
    handler = Recorder()
    peer = aiosmtpd_peer(handler, "127.0.0.2", port)
    with peer, pytest.raises(SMTPTLSError, match="STARTTLS not offered") as caught:
        await SMTPClient.connect(
            "127.0.0.2", port, helo_name="relay.test", tls="required", timeouts=FAST
        )
    assert caught.value.status == "4.7.10"
    assert handler.messages == []


async def test_opportunistic_falls_back_to_plain_text_after_a_failed_handshake(
    nursery: trio.Nursery,
) -> None:
    """The client must reconnect after the failed handshake and deliver without TLS."""
    peer = BrokenTlsPeer()
    port = await scripted_peer(nursery, "127.0.0.1", peer)
    result = await send_message(
        b"Subject: x\r\n\r\nbody\r\n",
        sender="a@relay.test",
        recipients=["b@remote.test"],
        host="127.0.0.1",
        port=port,
        tls="opportunistic",
        timeouts=FAST,
    )
    assert peer.first_commands == [b"STARTTLS", b"MAIL FROM:<a@relay.test>"]
    assert result.tls is None
    assert result.accepted == ("b@remote.test",)
    assert peer.delivered == [b"Subject: x\r\n\r\nbody\r\n.\r\n"]


async def test_connection_refused_and_silent_greeting(nursery: trio.Nursery) -> None:
    port = free_port()
    with pytest.raises(SMTPConnectError, match=r"connect to 127\.0\.0\.2"):
        await SMTPClient.connect("127.0.0.2", port, helo_name="relay.test", tls="none")

    async def silent(stream: trio.SocketStream, seen: list[bytes]) -> None:
        await trio.sleep_forever()

    silent_port = await scripted_peer(nursery, "127.0.0.1", silent)
    quick = Timeouts(greeting=0.2)
    with trio.fail_after(5), pytest.raises(SMTPTimeout, match=r"greeting within 0\.2s"):
        await SMTPClient.connect(
            "127.0.0.1", silent_port, helo_name="relay.test", tls="none", timeouts=quick
        )


async def test_slow_final_reply_times_out_with_data_end(nursery: trio.Nursery) -> None:
    async def stall(stream: trio.SocketStream, seen: list[bytes]) -> None:
        await stream.send_all(b"220 mx\r\n")
        await read_until(stream, seen, b"\r\n")
        await stream.send_all(b"250-mx\r\n250 PIPELINING\r\n")
        await read_until(stream, seen, b"DATA\r\n")
        await stream.send_all(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await read_until(stream, seen, b"\r\n.\r\n")
        await trio.sleep_forever()

    port = await scripted_peer(nursery, "127.0.0.1", stall)
    timeouts = Timeouts(command=5, data_end=0.2)
    client = await SMTPClient.connect(
        "127.0.0.1", port, helo_name="relay.test", tls="none", timeouts=timeouts
    )
    with trio.fail_after(3), pytest.raises(SMTPTimeout, match=r"end of data within 0\.2s"):
        await client.send("a@relay.test", ["b@remote.test"], b"x\r\n")
    assert not client.usable
    await client.aclose()


async def test_554_greeting_is_a_response_error(nursery: trio.Nursery) -> None:
    async def refuse(stream: trio.SocketStream, seen: list[bytes]) -> None:
        await stream.send_all(b"554 5.7.1 no service for you\r\n")
        await read_until(stream, seen, b"QUIT\r\n")
        await stream.send_all(b"221 bye\r\n")

    port = await scripted_peer(nursery, "127.0.0.1", refuse)
    with pytest.raises(SMTPResponseError) as caught:
        await SMTPClient.connect("127.0.0.1", port, helo_name="relay.test", tls="none")
    assert caught.value.stage == "greeting"
    assert caught.value.reply.code == 554
    assert caught.value.status == "5.7.1"


# --- the wire ----------------------------------------------------------------------


async def test_message_goes_out_dot_stuffed_with_strict_crlf(nursery: trio.Nursery) -> None:
    """Bare LF, bare CR and a smuggling attempt all leave as harmless CRLF lines."""
    wires: list[bytes] = []

    async def sink(stream: trio.SocketStream, seen: list[bytes]) -> None:
        await stream.send_all(b"220 mx\r\n")
        await read_until(stream, seen, b"\r\n")
        await stream.send_all(b"250 mx\r\n")  # no PIPELINING: one command at a time
        await read_until(stream, seen, b"\r\n")
        await stream.send_all(b"250 ok\r\n")
        await read_until(stream, seen, b"\r\n")
        await stream.send_all(b"250 ok\r\n")
        assert await read_until(stream, seen, b"\r\n") == b"DATA\r\n"
        await stream.send_all(b"354 go\r\n")
        wires.append(await read_until(stream, seen, b"\r\n.\r\n"))
        await stream.send_all(b"250 2.0.0 queued\r\n")
        await read_until(stream, seen, b"QUIT\r\n")
        await stream.send_all(b"221 bye\r\n")

    port = await scripted_peer(nursery, "127.0.0.1", sink)
    body = b"Subject: s\n\n.leading dot\nbare\rcr\n.\nMAIL FROM:<x@evil>\n\n.\r\nend"
    result = await send_message(
        body,
        sender="a@relay.test",
        recipients=["b@remote.test"],
        host="127.0.0.1",
        port=port,
        tls="none",
        timeouts=FAST,
    )
    assert result.reply is not None and result.reply.code == 250
    assert wires == [
        b"Subject: s\r\n\r\n..leading dot\r\nbare\r\ncr\r\n..\r\nMAIL FROM:<x@evil>\r\n"
        b"\r\n..\r\nend\r\n.\r\n"
    ]


async def test_size_limit_refuses_locally_and_sends_nothing() -> None:
    port = free_port()
    handler = Recorder()
    with aiosmtpd_peer(handler, "127.0.0.2", port, data_size_limit=200):
        async with await SMTPClient.connect(
            "127.0.0.2", port, helo_name="relay.test", tls="none", timeouts=FAST
        ) as client:
            assert client.max_size == 200
            result = await client.send("a@relay.test", ["b@remote.test"], b"x" * 500 + b"\r\n")
            small = await client.send("a@relay.test", ["b@remote.test"], b"small\r\n")
    (refusal,) = result.outcomes
    assert (refusal.code, refusal.status) == (552, "5.3.4")
    assert [r.code for r in small.outcomes] == [250]
    assert [m.content for m in handler.messages] == [b"small\r\n"]


async def test_smtputf8_and_8bitmime_when_offered_and_needed() -> None:
    port = free_port()
    handler = Recorder()
    with aiosmtpd_peer(handler, "127.0.0.2", port, enable_SMTPUTF8=True):
        async with await SMTPClient.connect(
            "127.0.0.2", port, helo_name="relay.test", tls="none", timeouts=FAST
        ) as client:
            plain = await client.send("a@relay.test", ["b@remote.test"], b"ascii\r\n")
            utf8 = await client.send(
                "a@relay.test", ["jos\u00e9@remote.test"], "caf\u00e9\r\n".encode()
            )
    assert [r.code for r in (*plain.outcomes, *utf8.outcomes)] == [250, 250]
    assert handler.messages[0].mail_options == ["SIZE=7"]
    assert set(handler.messages[1].mail_options) >= {"SMTPUTF8", "BODY=8BITMIME"}
    assert handler.messages[1].rcpt_tos == ["jos\u00e9@remote.test"]


async def test_utf8_address_without_smtputf8_fails_5_6_7() -> None:
    port = free_port()
    handler = Recorder()
    with aiosmtpd_peer(handler, "127.0.0.2", port, enable_SMTPUTF8=False):
        async with await SMTPClient.connect(
            "127.0.0.2", port, helo_name="relay.test", tls="none", timeouts=FAST
        ) as client:
            result = await client.send("a@relay.test", ["jos\u00e9@remote.test"], b"x\r\n")
    (refusal,) = result.outcomes
    assert (refusal.code, refusal.status) == (553, "5.6.7")
    assert handler.messages == []


# --- AUTH --------------------------------------------------------------------------


async def test_login_plain_login_and_bad_password(ca: trustme.CA) -> None:
    port = free_port()
    tls_ctx = server_tls(ca, MX1)
    with aiosmtpd_peer(
        Recorder(), "127.0.0.2", port, tls_context=tls_ctx, authenticator=authenticator
    ):
        async with await SMTPClient.connect(
            "127.0.0.2", port, helo_name="relay.test", tls="required", timeouts=FAST
        ) as client:
            assert "PLAIN" in client.extensions["AUTH"].split()
            assert (await client.login(USER, PASSWORD)).code == 235
        async with await SMTPClient.connect(
            "127.0.0.2", port, helo_name="relay.test", tls="required", timeouts=FAST
        ) as client:
            with pytest.raises(SMTPAuthError) as caught:
                await client.login(USER, "wrong")
        assert caught.value.reply is not None and caught.value.reply.code == 535
    port = free_port()
    with aiosmtpd_peer(
        Recorder(),
        "127.0.0.2",
        port,
        tls_context=tls_ctx,
        authenticator=authenticator,
        auth_exclude_mechanism=["PLAIN"],
    ):
        async with await SMTPClient.connect(
            "127.0.0.2", port, helo_name="relay.test", tls="required", timeouts=FAST
        ) as client:
            assert "PLAIN" not in client.extensions["AUTH"].split()
            assert (await client.login(USER, PASSWORD)).code == 235


async def test_credentials_never_go_out_in_plain_text() -> None:
    port = free_port()
    with aiosmtpd_peer(
        Recorder(), "127.0.0.2", port, authenticator=authenticator, auth_require_tls=False
    ):
        async with await SMTPClient.connect(
            "127.0.0.2", port, helo_name="relay.test", tls="opportunistic", timeouts=FAST
        ) as client:
            assert client.tls is None
            with pytest.raises(SMTPTLSError, match="without TLS"):
                await client.login(USER, PASSWORD)


# --- send_message ----------------------------------------------------------------------


async def test_send_message_from_emailmessage_drops_bcc(ca: trustme.CA) -> None:
    port = free_port()
    handler = Recorder()
    message = EmailMessage()
    message["From"] = "Alice <alice@relay.test>"
    message["To"] = "Bob <bob@remote.test>, carol@remote.test"
    message["Cc"] = "dave@remote.test"
    message["Bcc"] = "Eve <eve@remote.test>"
    message["Subject"] = "hello"
    message.set_content("Hi all.\n.\nBye\n")
    with aiosmtpd_peer(
        handler,
        "127.0.0.2",
        port,
        ssl_context=server_tls(ca, MX1),
        authenticator=authenticator,
        auth_require_tls=False,
    ):
        result = await send_message(
            message,
            host="127.0.0.2",
            port=port,
            tls="implicit",
            ssl_context=client_trust(ca),
            server_hostname=MX1,
            username=USER,
            password=PASSWORD,
            timeouts=FAST,
        )
    everyone = ["bob@remote.test", "carol@remote.test", "dave@remote.test", "eve@remote.test"]
    assert list(result.recipients) == everyone
    assert result.accepted == tuple(everyone)
    assert result.tls is not None
    (received,) = handler.messages
    assert received.mail_from == "alice@relay.test"
    assert received.rcpt_tos == everyone
    assert b"Bcc" not in received.content and b"eve@" not in received.content
    assert b"\r\nHi all.\r\n.\r\nBye\r\n" in received.content  # unstuffed again by the peer
    assert message["Bcc"] == "Eve <eve@remote.test>"  # the caller's object is untouched


async def test_send_message_raises_when_every_recipient_is_refused() -> None:
    port = free_port()
    handler = Recorder(rcpt_replies={"b@remote.test": "550 5.1.1 <b@remote.test>: no such user"})
    with aiosmtpd_peer(handler, "127.0.0.2", port), pytest.raises(SMTPSendError) as caught:
        await send_message(
            b"x\r\n",
            sender="a@relay.test",
            recipients=["b@remote.test"],
            host="127.0.0.2",
            port=port,
            tls="none",
            timeouts=FAST,
        )
    assert caught.value.status == "5.1.1"
    assert list(caught.value.result.refused) == ["b@remote.test"]


async def test_send_message_needs_an_envelope() -> None:
    with pytest.raises(ValueError, match="sender"):
        await send_message(b"x\r\n", recipients=["b@remote.test"])
    message = EmailMessage()
    message["From"] = "a@relay.test"
    with pytest.raises(ValueError, match="no recipients"):
        await send_message(message)
