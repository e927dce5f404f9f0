"""RemoteAgent end to end on loopback: a real DNS server, MX hosts on 127.0.0.2, .3 ...
(all on one port, the agent's [relay].port) played by aiosmtpd, scripted trio peers
and Postfix's smtp-sink. The system resolver is never used."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.dnsserver import DnsServer
from tests.test_client import (
    FAST,
    MX1,
    PASSWORD,
    USER,
    BrokenTlsPeer,
    Recorder,
    aiosmtpd_peer,
    authenticator,
    free_port,
    read_until,
    scripted_peer,
    server_tls,
)
from trio_mta.client import Timeouts
from trio_mta.config import RelayConfig
from trio_mta.delivery.agent import DeliveryItem, Outcome
from trio_mta.delivery.maildir import MaildirAgent
from trio_mta.delivery.remote import RemoteAgent
from trio_mta.dns import Resolver
from trio_mta.queue.scheduler import Scheduler
from trio_mta.queue.store import DueRecipient, NewMessage, NewRecipient, QueueStore

HOSTNAME = "relay.local.test"
BODY = b"From: alice@local.test\r\nSubject: hi\r\n\r\nhello\r\n"
ONE_MX = {
    "remote.test": [("MX", "10 mx1.remote.test.")],
    "mx1.remote.test": [("A", "127.0.0.2")],
}


def item(
    address: str, *, message_id: str = "Q1", sender: str = "alice@local.test", data: bytes = BODY
) -> DeliveryItem:
    rcpt = DueRecipient(
        message_id=message_id,
        rcpt_id=abs(hash((message_id, address))) % 1_000_000,
        address=address,
        original=address,
        mailbox=None,
        sender=sender,
        attempts=0,
        received_at=0.0,
    )
    return DeliveryItem(rcpt, data)


def make_agent(dns: DnsServer, relay: RelayConfig, **options: Any) -> RemoteAgent:
    options.setdefault("timeouts", FAST)
    return RemoteAgent(relay, Resolver([dns.address], timeout=2.0), hostname=HOSTNAME, **options)


@asynccontextmanager
async def running(agent: RemoteAgent) -> AsyncIterator[RemoteAgent]:
    """The agent with its idle-connection reaper, as the MTA runs it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        yield agent
        nursery.cancel_scope.cancel()


def attempts(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        dict(r.trio_mta_fields)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "delivery.attempt"
    ]


def kinds(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.kind for o in outcomes]


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")


# --- MX routing -------------------------------------------------------------------------


async def test_delivered_over_starttls(ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    handler = Recorder()
    with (
        DnsServer(ONE_MX) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(ca, MX1)),
    ):
        outcomes = await make_agent(dns, RelayConfig(port=port)).deliver([item("bob@remote.test")])
    assert outcomes == [
        Outcome("delivered", "2.0.0", "Ok: queued", 250, MX1, "127.0.0.2", "data"),
    ]
    assert outcomes[0].detail == f"250 2.0.0 Ok: queued ({MX1}[127.0.0.2])"
    (received,) = handler.messages
    assert received.tls
    assert (received.mail_from, received.rcpt_tos) == ("alice@local.test", ["bob@remote.test"])
    assert received.content == BODY
    (logged,) = attempts(caplog)
    assert logged["id"] == "Q1"
    assert (logged["host"], logged["address"]) == (MX1, "127.0.0.2")
    assert logged["tls"].startswith("TLSv1.")
    assert (logged["reply"], logged["outcome"]) == ("250 2.0.0 Ok: queued", "delivered")


async def test_first_mx_refuses_connection_second_receives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    handler = Recorder()
    records = {
        "remote.test": [("MX", "10 mx1.remote.test."), ("MX", "20 mx2.remote.test.")],
        "mx1.remote.test": [("A", "127.0.0.2")],  # nothing listens there
        "mx2.remote.test": [("A", "127.0.0.3")],
    }
    with DnsServer(records) as dns, aiosmtpd_peer(handler, "127.0.0.3", port):
        outcomes = await make_agent(dns, RelayConfig(port=port)).deliver([item("bob@remote.test")])
    assert kinds(outcomes) == ["delivered"]
    assert outcomes[0].detail.endswith("(mx2.remote.test[127.0.0.3])")
    assert len(handler.messages) == 1
    refused, delivered = attempts(caplog)
    assert (refused["host"], refused["outcome"]) == (MX1, "unreachable")
    assert "4.4.1" in refused["reply"] and "127.0.0.2" in refused["reply"]
    assert (delivered["host"], delivered["tls"]) == ("mx2.remote.test", "none")


async def test_silent_host_times_out_and_the_next_one_receives(nursery: trio.Nursery) -> None:
    port = free_port()

    async def silent(stream: trio.SocketStream, seen: list[bytes]) -> None:
        await trio.sleep_forever()

    await scripted_peer(nursery, "127.0.0.2", silent, port)
    handler = Recorder()
    records = {
        "remote.test": [("MX", "10 mx1.remote.test."), ("MX", "20 mx2.remote.test.")],
        "mx1.remote.test": [("A", "127.0.0.2")],
        "mx2.remote.test": [("A", "127.0.0.3")],
    }
    timeouts = Timeouts(connect=2, greeting=0.3, command=2)
    with DnsServer(records) as dns, aiosmtpd_peer(handler, "127.0.0.3", port):
        agent = make_agent(dns, RelayConfig(port=port), timeouts=timeouts)
        with trio.fail_after(5):
            outcomes = await agent.deliver([item("bob@remote.test")])
    assert kinds(outcomes) == ["delivered"]
    assert len(handler.messages) == 1


async def test_5xx_greeting_skips_the_rest_of_that_host(nursery: trio.Nursery) -> None:
    port = free_port()
    second_address: list[bytes] = []

    async def refuse(stream: trio.SocketStream, seen: list[bytes]) -> None:
        await stream.send_all(b"554 5.7.1 not for you\r\n")
        await read_until(stream, seen, b"QUIT\r\n")
        await stream.send_all(b"221 bye\r\n")

    async def must_not_be_called(stream: trio.SocketStream, seen: list[bytes]) -> None:
        second_address.append(b"connected")

    await scripted_peer(nursery, "127.0.0.2", refuse, port)
    await scripted_peer(nursery, "127.0.0.5", must_not_be_called, port)
    handler = Recorder()
    records = {
        "remote.test": [("MX", "10 mx1.remote.test."), ("MX", "20 mx2.remote.test.")],
        "mx1.remote.test": [("A", "127.0.0.2"), ("A", "127.0.0.5")],
        "mx2.remote.test": [("A", "127.0.0.3")],
    }
    with DnsServer(records) as dns, aiosmtpd_peer(handler, "127.0.0.3", port):
        outcomes = await make_agent(dns, RelayConfig(port=port)).deliver([item("bob@remote.test")])
    assert kinds(outcomes) == ["delivered"]
    assert second_address == []


async def test_one_host_down_defers_with_its_cause() -> None:
    port = free_port()
    with DnsServer(ONE_MX) as dns:
        outcomes = await make_agent(dns, RelayConfig(port=port)).deliver([item("bob@remote.test")])
    assert outcomes == [
        Outcome("deferred", "4.4.1", "Connection refused", None, MX1, "127.0.0.2", "connect")
    ]
    assert outcomes[0].detail == f"4.4.1 Connection refused ({MX1}[127.0.0.2], connect)"


async def test_a_deferral_keeps_every_hosts_cause(nursery: trio.Nursery) -> None:
    """It used to say only "all attempts to connect to 127.0.0.2:PORT failed", and only
    for the last MX host."""
    port = free_port()

    async def shutting_down(stream: trio.SocketStream, seen: list[bytes]) -> None:
        await stream.send_all(b"421 4.3.2 shutting down\r\n")

    await scripted_peer(nursery, "127.0.0.3", shutting_down, port)
    records = {
        "remote.test": [("MX", "10 mx1.remote.test."), ("MX", "20 mx2.remote.test.")],
        "mx1.remote.test": [("A", "127.0.0.2")],  # nothing listens there
        "mx2.remote.test": [("A", "127.0.0.3")],
    }
    with DnsServer(records) as dns:
        (outcome,) = await make_agent(dns, RelayConfig(port=port)).deliver(
            [item("bob@remote.test")]
        )
    assert outcome.kind == "deferred"
    assert outcome.text == (
        f"mx1.remote.test [127.0.0.2]:{port}: Connection refused; "
        f"mx2.remote.test [127.0.0.3]:{port}: 421 4.3.2 shutting down"
    )
    assert (outcome.status, outcome.code, outcome.remote_host) == ("4.3.2", None, None)


async def test_a_deferral_over_many_addresses_stays_bounded() -> None:
    port = free_port()
    addresses = [("A", f"127.0.1.{n}") for n in range(1, 40)]
    records = {"remote.test": [("MX", "10 mx1.remote.test.")], "mx1.remote.test": addresses}
    with DnsServer(records) as dns:
        (outcome,) = await make_agent(dns, RelayConfig(port=port)).deliver(
            [item("bob@remote.test")]
        )
    assert outcome.kind == "deferred"
    assert len(outcome.detail) <= 1000
    assert outcome.text.startswith(f"mx1.remote.test [127.0.1.1]:{port}: Connection refused; ")
    assert outcome.text.endswith(" more")


async def test_no_mx_falls_back_to_the_domain_address() -> None:
    port = free_port()
    handler = Recorder()
    with (
        DnsServer({"plain.test": [("A", "127.0.0.2")]}) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port),
    ):
        outcomes = await make_agent(dns, RelayConfig(port=port)).deliver([item("bob@plain.test")])
    assert [o.detail for o in outcomes] == ["250 2.0.0 Ok: queued (plain.test[127.0.0.2])"]
    assert handler.messages[0].rcpt_tos == ["bob@plain.test"]


async def test_null_mx_fails_5_1_10_and_servfail_defers() -> None:
    records = {"nomail.test": [("MX", "0 .")], "broken.test": [("A", "127.0.0.2")]}
    with DnsServer(records) as dns:
        dns.servfail("broken.test")
        agent = make_agent(dns, RelayConfig(port=free_port()))
        outcomes = [
            *await agent.deliver([item("bob@nomail.test")]),
            *await agent.deliver([item("carol@broken.test")]),
        ]
    assert kinds(outcomes) == ["failed", "deferred"]
    assert (outcomes[0].status, outcomes[0].stage, outcomes[0].code) == ("5.1.10", "dns", None)
    assert (outcomes[1].status, outcomes[1].stage) == ("4.4.3", "dns")


async def test_address_literal_goes_straight_to_the_address() -> None:
    port = free_port()
    handler = Recorder()
    with DnsServer({}) as dns, aiosmtpd_peer(handler, "127.0.0.2", port):
        outcomes = await make_agent(dns, RelayConfig(port=port)).deliver([item("bob@[127.0.0.2]")])
        assert dns.queries == []
    assert kinds(outcomes) == ["delivered"]
    assert handler.messages[0].rcpt_tos == ["bob@[127.0.0.2]"]


async def test_our_own_mx_entry_and_everything_below_it_are_skipped() -> None:
    port = free_port()
    handler = Recorder()  # mx3 would accept: reaching it would be a routing error
    records = {
        "loop.test": [("MX", f"10 {HOSTNAME}."), ("MX", "20 mx3.remote.test.")],
        "mid.test": [
            ("MX", "10 mx1.remote.test."),
            ("MX", f"20 {HOSTNAME}."),
            ("MX", "30 mx3.remote.test."),
        ],
        HOSTNAME: [("A", "127.0.0.1")],
        "mx1.remote.test": [("A", "127.0.0.2")],  # down
        "mx3.remote.test": [("A", "127.0.0.3")],
    }
    with DnsServer(records) as dns, aiosmtpd_peer(handler, "127.0.0.3", port):
        agent = make_agent(dns, RelayConfig(port=port))
        outcomes = [
            *await agent.deliver([item("bob@loop.test")]),
            *await agent.deliver([item("carol@mid.test")]),
        ]
    assert kinds(outcomes) == ["failed", "deferred"]
    assert (outcomes[0].status, outcomes[0].stage) == ("5.4.6", "route")
    assert "127.0.0.2" in outcomes[1].detail
    assert handler.messages == []


# --- replies decide ------------------------------------------------------------------


async def test_per_recipient_replies_decide_each_outcome() -> None:
    port = free_port()
    handler = Recorder(
        rcpt_replies={
            "b@remote.test": "550 5.1.1 <b@remote.test>: no such user",
            "c@remote.test": "451 4.2.0 <c@remote.test>: greylisted",
        }
    )
    with DnsServer(ONE_MX) as dns, aiosmtpd_peer(handler, "127.0.0.2", port):
        outcomes = await make_agent(dns, RelayConfig(port=port)).deliver(
            [item("a@remote.test"), item("b@remote.test"), item("c@remote.test")]
        )
    mx = (MX1, "127.0.0.2")
    assert outcomes == [
        Outcome("delivered", "2.0.0", "Ok: queued", 250, *mx, "data"),
        Outcome("failed", "5.1.1", "<b@remote.test>: no such user", 550, *mx, "rcpt"),
        Outcome("deferred", "4.2.0", "<c@remote.test>: greylisted", 451, *mx, "rcpt"),
    ]
    assert outcomes[1].detail == f"550 5.1.1 <b@remote.test>: no such user ({MX1}[127.0.0.2], rcpt)"
    assert [m.rcpt_tos for m in handler.messages] == [["a@remote.test"]]


@pytest.mark.parametrize(
    ("data_reply", "kind"),
    [("451 4.3.0 try again later", "deferred"), ("554 5.6.0 content rejected", "failed")],
)
async def test_final_reply_applies_to_every_accepted_recipient(data_reply: str, kind: str) -> None:
    port = free_port()
    handler = Recorder(rcpt_replies={"x@remote.test": "550 5.1.1 unknown"}, data_reply=data_reply)
    with DnsServer(ONE_MX) as dns, aiosmtpd_peer(handler, "127.0.0.2", port):
        outcomes = await make_agent(dns, RelayConfig(port=port)).deliver(
            [item("a@remote.test"), item("x@remote.test"), item("c@remote.test")]
        )
    assert kinds(outcomes) == [kind, "failed", kind]
    assert outcomes[0].reply == data_reply
    assert [o.stage for o in outcomes] == ["data", "rcpt", "data"]
    assert outcomes[1].reply == "550 5.1.1 unknown"


async def test_message_over_the_size_limit_fails_5_3_4() -> None:
    port = free_port()
    handler = Recorder()
    with DnsServer(ONE_MX) as dns, aiosmtpd_peer(handler, "127.0.0.2", port, data_size_limit=100):
        outcomes = await make_agent(dns, RelayConfig(port=port)).deliver(
            [item("bob@remote.test", data=b"x" * 1000 + b"\r\n")]
        )
    (outcome,) = outcomes
    assert outcome.kind == "failed"
    assert outcome.detail.startswith("552 5.3.4 ")
    assert handler.messages == []


# --- TLS policy ------------------------------------------------------------------------


async def test_required_tls_defers_on_a_host_without_starttls() -> None:
    port = free_port()
    handler = Recorder()
    with DnsServer(ONE_MX) as dns, aiosmtpd_peer(handler, "127.0.0.2", port):
        agent = make_agent(dns, RelayConfig(port=port, tls="required"))
        outcomes = await agent.deliver([item("bob@remote.test")])
    (outcome,) = outcomes
    assert outcome.kind == "deferred"
    assert outcome == Outcome(
        "deferred", "4.7.10", "STARTTLS not offered", None, MX1, "127.0.0.2", "tls"
    )
    assert handler.messages == []


async def test_verify_checks_the_certificate_against_the_mx_name(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """good.test's MX name is on the certificate; bad.test's MX, same address, is not."""
    port = free_port()
    handler = Recorder()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    records = {
        "good.test": [("MX", "10 mx1.remote.test.")],
        "bad.test": [("MX", "10 mx9.remote.test.")],
        "mx1.remote.test": [("A", "127.0.0.2")],
        "mx9.remote.test": [("A", "127.0.0.2")],
    }
    relay = RelayConfig(port=port, tls="verify", ca_file=bundle)
    with (
        DnsServer(records) as dns,
        aiosmtpd_peer(handler, "127.0.0.2", port, tls_context=server_tls(ca, MX1)),
    ):
        agent = make_agent(dns, relay)
        outcomes = [
            *await agent.deliver([item("bob@good.test")]),
            *await agent.deliver([item("carol@bad.test")]),
        ]
    assert kinds(outcomes) == ["delivered", "deferred"]
    assert "certificate verification failed" in outcomes[1].text
    assert (outcomes[1].status, outcomes[1].stage) == ("4.7.5", "tls")
    assert [m.rcpt_tos for m in handler.messages] == [["bob@good.test"]]


async def test_opportunistic_delivers_in_plain_text_when_the_handshake_breaks(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    peer = BrokenTlsPeer()
    port = await scripted_peer(nursery, "127.0.0.2", peer)
    with DnsServer(ONE_MX) as dns:
        outcomes = await make_agent(dns, RelayConfig(port=port)).deliver([item("bob@remote.test")])
    assert kinds(outcomes) == ["delivered"]
    assert peer.first_commands[0] == b"STARTTLS"
    assert len(peer.delivered) == 1
    assert attempts(caplog)[-1]["tls"] == "none"


# --- transactions and connections -----------------------------------------------------


async def test_one_batch_is_one_transaction_and_must_be_one_destination() -> None:
    """Grouping is the scheduler's: the agent refuses a batch it would have to split."""
    port = free_port()
    first = Recorder()
    batch = [item("a@remote.test"), item("b@remote.test"), item("c@REMOTE.test")]
    with DnsServer(ONE_MX) as dns, aiosmtpd_peer(first, "127.0.0.2", port):
        agent = make_agent(dns, RelayConfig(port=port))
        outcomes = await agent.deliver(batch)
        with pytest.raises(ValueError, match="one message to one destination"):
            await agent.deliver([item("a@remote.test"), item("z@other.test")])
        with pytest.raises(ValueError, match="one message to one destination"):
            await agent.deliver([item("a@remote.test"), item("b@remote.test", message_id="Q2")])
    assert kinds(outcomes) == ["delivered"] * 3
    assert [m.rcpt_tos for m in first.messages] == [
        ["a@remote.test", "b@remote.test", "c@REMOTE.test"]
    ]


async def test_connection_reused_for_the_next_message_then_closed_when_idle() -> None:
    port = free_port()
    handler = Recorder()
    with DnsServer(ONE_MX) as dns, aiosmtpd_peer(handler, "127.0.0.2", port):
        agent = make_agent(dns, RelayConfig(port=port), idle_timeout=0.3)
        async with running(agent):
            for queue_id in ("Q1", "Q2", "Q3"):
                outcomes = await agent.deliver([item("bob@remote.test", message_id=queue_id)])
                assert kinds(outcomes) == ["delivered"]
            assert handler.connections == 1
            await trio.sleep(0.6)  # past idle_timeout: the reaper closed it
            outcomes = await agent.deliver([item("bob@remote.test", message_id="Q4")])
            assert kinds(outcomes) == ["delivered"]
    assert len(handler.messages) == 4
    assert handler.connections == 2


async def test_a_slow_domain_cannot_take_every_slot(tmp_path: Path) -> None:
    """The scheduler owns the per-destination limit; the agent delivers what it is given."""
    port = free_port()
    slow, fast = Recorder(data_delay=0.5), Recorder()
    records = {
        "slow.test": [("MX", "10 mx.slow.test.")],
        "mx.slow.test": [("A", "127.0.0.2")],
        "fast.test": [("MX", "10 mx.fast.test.")],
        "mx.fast.test": [("A", "127.0.0.3")],
    }
    store = QueueStore(tmp_path / "queue.sqlite3")
    now = time.time()

    def to(address: str) -> NewMessage:
        return NewMessage("alice@local.test", (NewRecipient(address, address, None),), BODY)

    store.insert([(f"S{n}", to("bob@slow.test")) for n in range(4)], now=now)
    store.insert([("F", to("bob@fast.test"))], now=now + 0.001)
    with (
        DnsServer(records) as dns,
        aiosmtpd_peer(slow, "127.0.0.2", port),
        aiosmtpd_peer(fast, "127.0.0.3", port),
    ):
        agent = make_agent(dns, RelayConfig(port=port))
        scheduler = Scheduler(
            store,
            local_agent=MaildirAgent(tmp_path, HOSTNAME, limiter=trio.CapacityLimiter(1)),
            remote_agent=agent,
            retry_initial=60,
            retry_max=60,
            max_age=3600,
            concurrency=3,
            per_domain=2,
            poll_interval=0.05,
        )
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await nursery.start(scheduler.run)
            with trio.fail_after(10):
                while not fast.messages:
                    await trio.sleep(0.01)
                fast_done = trio.current_time() - start
                while scheduler.delivered < 5:
                    await trio.sleep(0.01)
            all_done = trio.current_time() - start
            nursery.cancel_scope.cancel()
    store.close()
    assert slow.max_in_data == 2
    assert fast_done < 0.5
    assert all_done >= 1.0  # two rounds of two


# --- smarthost ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_smarthost_with_auth_over_implicit_tls(ca: trustme.CA) -> None:
    """No MX lookups at all; every domain goes to the smarthost, logged in.
    aiosmtpd only counts STARTTLS as TLS for auth_require_tls, hence False here:
    the port is TLS from the first byte anyway."""
    port = free_port()
    handler = Recorder()
    relay = RelayConfig(
        smarthost=f"127.0.0.2:{port}",
        smarthost_tls="implicit",
        smarthost_auth=f"{USER}:{PASSWORD}",
    )
    with (
        DnsServer({}) as dns,
        aiosmtpd_peer(
            handler,
            "127.0.0.2",
            port,
            ssl_context=server_tls(ca, MX1),
            authenticator=authenticator,
            auth_required=True,
            auth_require_tls=False,
        ),
    ):
        outcomes = await make_agent(dns, relay).deliver(
            [item("bob@any.test"), item("carol@other.test")]
        )
        assert dns.queries == []
    assert kinds(outcomes) == ["delivered", "delivered"]
    assert sorted(r for m in handler.messages for r in m.rcpt_tos) == [
        "bob@any.test",
        "carol@other.test",
    ]


async def test_smarthost_by_name_with_auth_over_starttls(ca: trustme.CA) -> None:
    port = free_port()
    handler = Recorder()
    relay = RelayConfig(
        smarthost=f"smarthost.remote.test:{port}",
        smarthost_tls="starttls",
        smarthost_auth=f"{USER}:{PASSWORD}",
    )
    bad = RelayConfig(
        smarthost=relay.smarthost, smarthost_tls="starttls", smarthost_auth=f"{USER}:wrong"
    )
    records = {"smarthost.remote.test": [("A", "127.0.0.3")]}
    with (
        DnsServer(records) as dns,
        aiosmtpd_peer(
            handler,
            "127.0.0.3",
            port,
            tls_context=server_tls(ca, "smarthost.remote.test"),
            authenticator=authenticator,
            auth_required=True,
            auth_require_tls=True,
        ),
    ):
        good = await make_agent(dns, relay).deliver([item("bob@any.test")])
        refused = await make_agent(dns, bad).deliver([item("carol@any.test")])
    assert kinds(good) == ["delivered"]
    assert good[0].detail.endswith("(smarthost.remote.test[127.0.0.3])")
    assert [m.rcpt_tos for m in handler.messages] == [["bob@any.test"]]
    assert handler.messages[0].tls
    assert kinds(refused) == ["deferred"]
    assert refused[0].detail == (
        "535 5.7.8 Authentication credentials invalid (smarthost.remote.test[127.0.0.3], auth)"
    )


# --- Postfix's smtp-sink ------------------------------------------------------------------


@contextmanager
def smtp_sink(address: str, port: int, *options: str) -> Iterator[Path]:
    """smtp-sink on address:port dumping each transaction into the yielded folder."""
    binary = shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None
    )
    if binary is None:
        pytest.skip("smtp-sink (Debian package postfix) is not installed; .ci/run installs it")
    dump = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
    dump.chmod(0o777)  # smtp-sink writes as nobody after binding
    process = subprocess.Popen(
        [binary, "-u", "nobody", *options, "-d", f"{dump}/%M.", f"{address}:{port}", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield dump
    finally:
        process.terminate()
        process.wait(timeout=5)
        shutil.rmtree(dump, ignore_errors=True)


async def wait_for_port(address: str, port: int) -> None:
    with trio.fail_after(5):
        while True:
            try:
                stream = await trio.open_tcp_stream(address, port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def test_delivery_to_postfix_smtp_sink(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port("127.0.0.4")
    records = {
        "sink.test": [("MX", "10 sink.remote.test.")],
        "sink.remote.test": [("A", "127.0.0.4")],
    }
    body = b"Subject: sink\r\n\r\nline\n.dot line\r\nlast"
    with smtp_sink("127.0.0.4", port) as dump, DnsServer(records) as dns:
        await wait_for_port("127.0.0.4", port)
        outcomes = await make_agent(dns, RelayConfig(port=port)).deliver(
            [item("a@sink.test", data=body), item("b@sink.test", data=body)]
        )
        assert kinds(outcomes) == ["delivered", "delivered"]
        assert attempts(caplog)[-1]["tls"] == "none"  # smtp-sink offers no STARTTLS
        with trio.fail_after(5):
            while not any(dump.iterdir()):
                await trio.sleep(0.05)
        await trio.sleep(0.1)  # the dump file is complete once the sink answered 250
        (capture,) = [p.read_bytes() for p in dump.iterdir()]
    assert b"X-Rcpt-Args: <a@sink.test>\nX-Rcpt-Args: <b@sink.test>\n" in capture
    assert capture.endswith(b"\nSubject: sink\n\nline\n.dot line\nlast\n\n")  # + dump separator


@pytest.mark.parametrize("goodbye", [b"", b"421 4.4.2 mx1 idle timeout, closing\r\n"])
async def test_a_pooled_connection_closed_while_idle_is_replaced_not_failed(
    nursery: trio.Nursery, goodbye: bytes
) -> None:
    """No RSET probe before reuse: a peer that hung up (silently, or with its 421
    goodbye) is noticed at MAIL and the message goes over a fresh connection."""
    port = free_port()
    delivered: list[bytes] = []

    async def one_message_then_hang_up(stream: trio.SocketStream, seen: list[bytes]) -> None:
        await stream.send_all(b"220 mx1.remote.test ESMTP\r\n")
        await read_until(stream, seen, b"\r\n")
        await stream.send_all(b"250-mx1.remote.test\r\n250 PIPELINING\r\n")
        await read_until(stream, seen, b"DATA\r\n")
        await stream.send_all(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n")
        body = await read_until(stream, seen, b"\r\n.\r\n")
        delivered.append(body)
        await stream.send_all(b"250 2.0.0 queued\r\n")
        await trio.sleep(0.1)
        await stream.send_all(goodbye)  # the server's idle timeout, while we hold it pooled

    await scripted_peer(nursery, "127.0.0.2", one_message_then_hang_up, port)
    with DnsServer(ONE_MX) as dns:
        agent = make_agent(dns, RelayConfig(port=port, tls="none"), idle_timeout=30)
        async with running(agent):
            first = await agent.deliver([item("bob@remote.test", message_id="Q1")])
            await trio.sleep(0.3)
            second = await agent.deliver([item("bob@remote.test", message_id="Q2")])
    assert kinds(first) == kinds(second) == ["delivered"]
    assert len(delivered) == 2
