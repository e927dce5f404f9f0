"""trio_mta.testing's capture servers, driven by real clients over loopback.

smtplib (the client most applications use), raw sockets for byte-exact
conversations (pipelining, BDAT, bare LF) and trio_mta's own client. What is
asserted is what SPEC §14 promises: every message kept, byte for byte, with no
trace header; STARTTLS that a client can verify; a clear failure from
``wait_for``; nothing left running after ``stop()``.
"""

from __future__ import annotations

import email.policy
import smtplib
import socket
import ssl
import threading
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
import trio

import trio_mta
from trio_mta.testing import MessagesNotReceived, SMTPCapture, TrioSMTPCapture, open_capture


def raw_session(capture: SMTPCapture, script: bytes, *, replies: int) -> list[bytes]:
    """Send ``script`` in one write (pipelined) and read ``replies`` final reply lines."""
    with socket.create_connection((capture.host, capture.port), timeout=10) as sock:
        buffer = b""
        lines: list[bytes] = []
        sock.sendall(script)
        while len(lines) < replies + 1:  # +1: the banner
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\r\n")
            lines += [line for line in complete if line[3:4] != b"-"]
        return lines[1:]


@pytest.fixture
def capture() -> SMTPCapture:
    with SMTPCapture() as cap:
        yield cap  # type: ignore[misc]


def test_smtplib_message_is_kept_exactly_with_its_envelope(capture: SMTPCapture) -> None:
    data = (
        b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hello\r\n\r\n"
        b".leading dot\r\n..two dots\r\n.\r\n" + b"x" * 998 + b"\r\nend\r\n"
    )
    with smtplib.SMTP(capture.host, capture.port) as client:
        client.sendmail("a@example.test", ["b@example.test", "c@other.test"], data)
    (msg,) = capture.wait_for(1)
    assert msg.sender == "a@example.test"
    assert msg.recipients == ["b@example.test", "c@other.test"]
    assert msg.data == data  # dot-stuffing undone, no Received:, no Message-ID/Date added
    assert msg.message["Subject"] == "hello"
    assert msg.message.policy == email.policy.default
    assert msg.tls is None


def test_messages_keep_arrival_order_and_clear_forgets_them(capture: SMTPCapture) -> None:
    with smtplib.SMTP(capture.host, capture.port) as client:
        for n in range(3):
            client.sendmail("a@example.test", [f"r{n}@example.test"], f"Subject: {n}\r\n\r\n")
    assert [m.recipients for m in capture.wait_for(3)] == [
        ["r0@example.test"],
        ["r1@example.test"],
        ["r2@example.test"],
    ]
    capture.clear()
    assert capture.messages == []
    with smtplib.SMTP(capture.host, capture.port) as client:
        client.sendmail("", ["late@example.test"], b"Subject: again\r\n\r\n")
    (msg,) = capture.wait_for(1)
    assert msg.sender == ""  # the null reverse-path <>
    assert msg.message["Subject"] == "again"


def test_starttls_verifies_with_the_capture_ca(capture: SMTPCapture) -> None:
    with smtplib.SMTP(capture.host, capture.port) as client:
        client.starttls(context=capture.ssl_context)
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: tls\r\n\r\n")
    from_file = ssl.create_default_context(cafile=str(capture.cafile))
    with smtplib.SMTP("localhost", capture.port) as client:
        client.starttls(context=from_file)
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: tls 2\r\n\r\n")
    first, second = capture.wait_for(2)
    assert first.tls is not None and first.tls.startswith("TLSv1.")
    assert second.tls is not None


def test_starttls_certificate_is_not_trusted_by_default(capture: SMTPCapture) -> None:
    """The CA is the test's own: a client verifying against the system store must refuse."""
    with smtplib.SMTP(capture.host, capture.port) as client, pytest.raises(ssl.SSLError):
        client.starttls(context=ssl.create_default_context())


def test_smtputf8_and_8bitmime_reach_the_message(capture: SMTPCapture) -> None:
    data = "From: jörg@example.test\r\nSubject: grüße\r\n\r\nÄrger\r\n".encode()
    with smtplib.SMTP(capture.host, capture.port) as client:
        client.ehlo()
        assert client.has_extn("smtputf8") and client.has_extn("8bitmime")
        client.sendmail(
            "jörg@example.test",
            ["zoë@example.test"],
            data,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    (msg,) = capture.wait_for(1)
    assert (msg.sender, msg.recipients, msg.data) == (
        "jörg@example.test",
        ["zoë@example.test"],
        data,
    )
    assert msg.smtputf8 and msg.body == "8BITMIME"
    assert msg.message["Subject"] == "grüße"


def test_pipelined_commands_and_bdat_chunks(capture: SMTPCapture) -> None:
    """PIPELINING (RFC 2920) and CHUNKING (RFC 3030) in one write; BDAT bytes are raw."""
    body = b"Subject: chunks\r\n\r\n.not stuffed\r\n"
    script = (
        b"EHLO client.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
        b"BDAT 10\r\n"
        + body[:10]
        + b"BDAT "
        + str(len(body) - 10).encode()
        + b" LAST\r\n"
        + body[10:]
        + b"QUIT\r\n"
    )
    codes = [line[:3] for line in raw_session(capture, script, replies=6)]
    assert codes == [b"250", b"250", b"250", b"250", b"250", b"221"]
    (msg,) = capture.wait_for(1)
    assert msg.data == body
    assert msg.helo == "client.test"


def test_bare_lf_in_data_is_refused_not_kept(capture: SMTPCapture) -> None:
    """The production rules hold: a smuggling-shaped message gets 550 5.5.2 and is not kept."""
    script = b"EHLO c.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
    with socket.create_connection((capture.host, capture.port), timeout=10) as sock:
        sock.sendall(script)
        time.sleep(0.2)
        sock.sendall(b"Subject: x\r\n\nbare\n.\r\nmore\r\n.\r\nQUIT\r\n")
        received = b""
        while b"221" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    assert b"550 5.5.2" in received
    assert capture.messages == []


def test_message_that_looks_like_our_trace_header_is_kept_intact(capture: SMTPCapture) -> None:
    """Only the server's own Received field is removed, never the client's lines."""
    data = (
        b"Received: from evil (x)\r\n\tby localhost (trio_mta) with ESMTP id X;\r\n"
        b"\tMon, 1 Jan 2024 00:00:00 +0000\r\n \tcontinuation\r\nSubject: s\r\n\r\n"
    )
    with smtplib.SMTP(capture.host, capture.port) as client:
        client.sendmail("a@example.test", ["b@example.test"], data)
        client.sendmail("a@example.test", ["b@example.test"], b"\tstarts with a tab\r\n")
    first, second = capture.wait_for(2)
    assert first.data == data
    assert second.data == b"\tstarts with a tab\r\n"


def test_wait_for_names_what_arrived_when_it_times_out(capture: SMTPCapture) -> None:
    with pytest.raises(
        MessagesNotReceived,
        match=r"expected 1 message at 127\.0\.0\.1:\d+, "
        r"none arrived within 0\.2 s",
    ):
        capture.wait_for(1, timeout=0.2)
    with smtplib.SMTP(capture.host, capture.port) as client:
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: only one\r\n\r\n")
    with pytest.raises(AssertionError) as caught:
        capture.wait_for(2, timeout=0.5)
    assert isinstance(caught.value, TimeoutError)
    assert "only 1 arrived" in str(caught.value)
    assert "#1 from <a@example.test> to <b@example.test>, Subject: 'only one'" in str(caught.value)


def test_auth_users_can_log_in() -> None:
    with SMTPCapture(users={"app": "s3cret"}) as capture:
        with smtplib.SMTP(capture.host, capture.port) as client:
            client.starttls(context=capture.ssl_context)
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("app", "wrong")
            client.login("app", "s3cret")
            client.sendmail("a@example.test", ["b@example.test"], b"Subject: auth\r\n\r\n")
        (msg,) = capture.wait_for(1)
        assert msg.auth_user == "app"


def trio_worker_threads() -> set[threading.Thread]:
    """trio's idle thread cache (to_thread workers, reused and gone after 10 s idle)."""
    return {t for t in threading.enumerate() if t.name.startswith("Trio thread")}


def test_stop_leaves_nothing_running() -> None:
    before = set(threading.enumerate())
    capture = SMTPCapture().start()
    address, folder = (capture.host, capture.port), capture.cafile.parent
    assert folder.is_dir()
    capture.stop()
    assert set(threading.enumerate()) - before - trio_worker_threads() == set()
    assert not folder.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()
    capture.stop()  # idempotent


def test_many_captures_do_not_accumulate_threads() -> None:
    for _ in range(3):
        SMTPCapture().start().stop()
    before = len(threading.enumerate())
    for _ in range(10):
        with SMTPCapture():
            pass
    assert len(threading.enumerate()) <= before + 1


def test_startup_time_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """Measured, never asserted (timings are not test outcomes): see docs/testing.md."""
    SMTPCapture().start().stop()  # imports and the CA are once per process
    times = []
    for _ in range(5):
        started = time.perf_counter()
        with SMTPCapture():
            times.append(time.perf_counter() - started)
    with capsys.disabled():
        print(
            f"\nSMTPCapture start+stop: best {min(times) * 1000:.1f} ms, "
            f"worst {max(times) * 1000:.1f} ms"
        )


def test_a_port_in_use_is_a_clear_error() -> None:
    in_use = r"did not start: cannot listen on 127\.0\.0\.1:\d+ \(smtp\): address already in use"
    with SMTPCapture() as first, pytest.raises(RuntimeError, match=in_use):
        SMTPCapture(port=first.port).start()


def test_without_pytest_the_context_manager_works(tmp_path: Path) -> None:
    """The class is plain Python: a script (not a test) can use it too."""
    script = tmp_path / "send.py"
    script.write_text(
        "import smtplib\n"
        "from trio_mta.testing import SMTPCapture\n"
        "with SMTPCapture() as cap:\n"
        "    smtplib.SMTP(cap.host, cap.port).sendmail('a@x.test', ['b@y.test'], 'Subject: s')\n"
        "    print(cap.wait_for(1)[0].data)\n"
    )
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == repr(b"Subject: s\r\n")


# ---------------------------------------------------------------- the trio flavour


async def test_trio_capture_with_send_message(nursery: trio.Nursery) -> None:
    capture: TrioSMTPCapture = await nursery.start(TrioSMTPCapture().serve)
    message = EmailMessage()
    message["From"] = "app@example.test"
    message["To"] = "user@example.test"
    message["Subject"] = "from trio"
    message.set_content(".dot first\nsecond line\n")
    result = await trio_mta.send_message(
        message,
        host=capture.host,
        port=capture.port,
        tls="verify",
        ssl_context=capture.ssl_context,
        server_hostname="localhost",
    )
    assert result.tls is not None
    (msg,) = await capture.wait_for(1)
    assert msg.recipients == ["user@example.test"]
    assert msg.message.get_content() == ".dot first\nsecond line\n"
    assert msg.tls is not None
    await capture.aclose()
    with pytest.raises(OSError):
        await trio.open_tcp_stream(capture.host, capture.port)


async def test_trio_wait_for_times_out_clearly() -> None:
    async with open_capture() as capture:
        with pytest.raises(MessagesNotReceived, match=r"none arrived within 0\.1 s"):
            await capture.wait_for(1, timeout=0.1)
        folder = capture.cafile.parent
    assert not folder.exists()
