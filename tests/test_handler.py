"""The handler API: an application decides replies and takes messages itself."""

from __future__ import annotations

import smtplib
from collections.abc import Callable

import pytest
import trio

import trio_mta
from trio_mta.config import Config

from .maildirs import new_files, wait_for_mail


class Recorder(trio_mta.Handler):
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes, trio_mta.SessionInfo]] = []

    async def handle_rcpt(
        self, session: trio_mta.SessionInfo, envelope: trio_mta.Envelope, address: str
    ) -> trio_mta.Reply | str | None:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user here"
        if address.startswith("app@"):
            return trio_mta.Reply(250, "2.1.5", "app takes it")
        return None  # routing decides

    async def handle_message(
        self, session: trio_mta.SessionInfo, envelope: trio_mta.Envelope, data: bytes
    ) -> trio_mta.Reply | str | None:
        subject = data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]
        if subject == b"defer":
            return "451 4.3.0 application busy"
        if subject == b"reject":
            return trio_mta.Reply(550, "5.7.1", "not wanted")
        if subject == b"queue":
            return None  # deliver as usual
        self.messages.append(
            (envelope.sender_address, [r.address for r in envelope.recipients], data, session)
        )
        return "250 2.0.0 taken by the app"


def _send(port: int, subject: str, rcpts: list[str]) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("c.test")
        client.mail("s@remote.test")
        for rcpt in rcpts:
            client.rcpt(rcpt)
        return client.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())


@pytest.mark.parametrize("queue", [True, False])
async def test_handler_decides_by_return_value(
    nursery: trio.Nursery, queue: bool, make_config: Callable[..., Config]
) -> None:
    handler = Recorder()
    mta: trio_mta.MTA = await nursery.start(
        lambda task_status: trio_mta.serve(
            make_config(), handler=handler, queue=queue, task_status=task_status
        )
    )
    port = mta.address("smtp")[1]
    assert await trio.to_thread.run_sync(_send, port, "take", ["app@anything.test"]) == (
        250,
        b"2.0.0 taken by the app",
    )
    assert await trio.to_thread.run_sync(_send, port, "defer", ["bob@example.test"]) == (
        451,
        b"4.3.0 application busy",
    )
    assert await trio.to_thread.run_sync(_send, port, "reject", ["bob@example.test"]) == (
        550,
        b"5.7.1 not wanted",
    )
    [(sender, rcpts, data, session)] = handler.messages
    assert sender == "s@remote.test" and rcpts == ["app@anything.test"]
    assert data.startswith(b"Received: from c.test") and data.endswith(b"\r\nbody\r\n")
    assert session.client_ip == "127.0.0.1" and session.tls is None

    def nobody() -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("c.test")
            client.mail("s@remote.test")
            return client.rcpt("nobody@example.test")[0]

    assert await trio.to_thread.run_sync(nobody) == 550
    code, text = await trio.to_thread.run_sync(_send, port, "queue", ["bob@example.test"])
    root = mta.config.local.maildir_root
    if queue:
        assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
        await wait_for_mail(root, "bob")
    else:
        # Without the durable queue a message the handler leaves alone has nowhere
        # to go: refused for now rather than acknowledged and dropped.
        assert mta.store is None
        assert code == 451
        await trio.sleep(0.2)
        assert new_files(root, "bob") == []


async def test_handler_accepted_recipient_without_a_route_is_never_acknowledged(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    class AcceptsAll(trio_mta.Handler):
        async def handle_rcpt(
            self, session: trio_mta.SessionInfo, envelope: trio_mta.Envelope, address: str
        ) -> str:
            return "250 2.1.5 ok"

    config = make_config(local={"mailboxes": {"known@example.test": "known"}})
    mta: trio_mta.MTA = await nursery.start(
        lambda task_status: trio_mta.serve(config, handler=AcceptsAll(), task_status=task_status)
    )
    code, text = await trio.to_thread.run_sync(
        _send, mta.address("smtp")[1], "fall through", ["stranger@example.test"]
    )
    assert (code, text) == (
        550,
        b"5.1.1 <stranger@example.test>: Recipient address has no mailbox here",
    )
    assert mta.store is not None
    assert await trio.to_thread.run_sync(mta.store.list_messages) == []


async def test_queue_false_needs_a_handler(make_config: Callable[..., Config]) -> None:
    with pytest.raises(ValueError, match="handler"):
        await trio_mta.serve(make_config(), queue=False)


async def test_a_crashing_or_malformed_hook_answers_451(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    class Broken(trio_mta.Handler):
        async def handle_rcpt(
            self, session: trio_mta.SessionInfo, envelope: trio_mta.Envelope, address: str
        ) -> str | None:
            if address.startswith("garbled@"):
                return "two hundred fifty"
            return None

        async def handle_message(
            self, session: trio_mta.SessionInfo, envelope: trio_mta.Envelope, data: bytes
        ) -> None:
            raise RuntimeError("application bug")

    mta: trio_mta.MTA = await nursery.start(
        lambda task_status: trio_mta.serve(
            make_config(), handler=Broken(), queue=False, task_status=task_status
        )
    )
    port = mta.address("smtp")[1]

    def converse() -> tuple[int, int, int]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("c.test")
            client.mail("s@remote.test")
            garbled = client.rcpt("garbled@example.test")[0]
            client.rcpt("fine@example.test")
            data = client.data(b"Subject: x\r\n\r\nbody\r\n")[0]
            return garbled, data, client.noop()[0]

    # The session survives both: the next command still gets its answer.
    assert await trio.to_thread.run_sync(converse) == (451, 451, 250)
