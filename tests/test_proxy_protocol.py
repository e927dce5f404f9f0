"""PROXY protocol listeners (SPEC §11): the header's address is the client's for every
purpose; anything else is closed without a banner. Raw sockets here; a real HAProxy in
test_proxy_haproxy.py."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

import pytest
import trio

from trio_mta.config import Config, ConfigError
from trio_mta.mta import MTA, serve
from trio_mta.proxy import V2_SIGNATURE, ProxyHeader, format_v1, format_v2

from .conftest import HOSTNAME
from .maildirs import wait_for_mail
from .rawsmtp import RawClient


def proxy_listeners(*, proxy_from: list[str] | None = None) -> list[dict[str, Any]]:
    allowed = ["127.0.0.1/32"] if proxy_from is None else proxy_from
    return [
        {"address": "127.0.0.1:0", "mode": "smtp", "proxy_protocol": True, "proxy_from": allowed},
        {"address": "127.0.0.1:0", "mode": "smtps", "proxy_protocol": True, "proxy_from": allowed},
    ]


async def start(nursery: trio.Nursery, make_config: Callable[..., Config], **sections: Any) -> MTA:
    sections.setdefault("listen", proxy_listeners())
    server: MTA = await nursery.start(serve, make_config(**sections))
    return server


def v1(client: str, port: int = 40000) -> bytes:
    return format_v1(ProxyHeader(1, "PROXY", "TCP4", (client, port), ("127.0.0.1", 25)))


def v2(client: str, port: int = 40000, tlvs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    dest = "::1" if family == "TCP6" else "127.0.0.1"
    return format_v2(ProxyHeader(2, "PROXY", family, (client, port), (dest, 25), tlvs))


async def connect(server: MTA, mode: str = "smtp") -> RawClient:
    return await RawClient.connect(*server.address(mode))


async def assert_closed_without_banner(client: RawClient) -> None:
    assert await client.eof(timeout=10)
    assert client.buffer == b"", "no banner, no reply: the connection just closes"


def refusals(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [
        getattr(r, "trio_mta_fields", {})
        for r in caplog.records
        if r.getMessage() == "smtpd.proxy_refused"
    ]


async def relay_reply(client: RawClient) -> bytes:
    assert (await client.reply()).startswith(b"220 ")
    assert (await client.command(b"EHLO client.example")).startswith(b"250")
    assert (await client.command(b"MAIL FROM:<a@remote.test>")).startswith(b"250")
    return await client.command(b"RCPT TO:<b@remote.test>")


@pytest.mark.parametrize("make_header", [v1, v2])
async def test_the_headers_address_decides_relaying_not_the_proxys(
    nursery: trio.Nursery, make_config: Callable[..., Config], make_header: Callable[[str], bytes]
) -> None:
    """The proxy at 127.0.0.1 is a trusted network; the client it speaks for is not."""
    server = await start(
        nursery, make_config, relay={"trusted_networks": ["127.0.0.1/32", "10.0.0.0/8"]}
    )
    outside = await connect(server)
    await outside.send(make_header("203.0.113.7"))
    assert (await relay_reply(outside)).startswith(b"554 5.7.1")
    inside = await connect(server)
    await inside.send(make_header("10.1.2.3"))
    assert (await relay_reply(inside)).startswith(b"250")


async def test_received_header_and_log_name_the_client_behind_the_proxy(
    nursery: trio.Nursery, make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    server = await start(nursery, make_config)
    client = await connect(server)
    await client.send(v2("2001:db8::25", 4242))
    assert (await client.reply()).startswith(b"220 ")
    for line in (
        b"EHLO client.example",
        b"MAIL FROM:<a@remote.test>",
        b"RCPT TO:<bob@example.test>",
        b"DATA",
    ):
        assert (await client.command(line))[:1] in (b"2", b"3")
    assert (await client.command(b"Subject: hi\r\n\r\nbody\r\n.")).startswith(b"250")
    [path] = await wait_for_mail(server.config.local.maildir_root, "bob")
    assert b"Received: from client.example ([IPv6:2001:db8::25])" in path.read_bytes()
    connects = [
        getattr(r, "trio_mta_fields", {})
        for r in caplog.records
        if r.getMessage() == "smtpd.connect"
    ]
    assert {"client": "2001:db8::25", "port": 4242, "proxy": "127.0.0.1"}.items() <= connects[
        -1
    ].items()


async def test_connection_limits_count_the_clients_behind_the_proxy(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    """One proxy address, many clients: max_connections_per_ip is per real client."""
    server = await start(nursery, make_config, limits={"max_connections_per_ip": 1})
    first = await connect(server)
    await first.send(v1("198.51.100.1"))
    assert (await first.reply()).startswith(b"220 ")
    other = await connect(server)
    await other.send(v1("198.51.100.2"))
    assert (await other.reply()).startswith(b"220 "), "another client: its own limit"
    again = await connect(server)
    await again.send(v1("198.51.100.1"))
    assert (await again.reply()).startswith(b"421 4.7.0")


async def test_header_followed_at_once_by_smtp_keeps_the_early_bytes(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    server = await start(nursery, make_config)
    client = await connect(server)
    await client.send(v2("192.0.2.9", tlvs=((0x04, b"noop"), (0x05, b"id"))) + b"NOOP\r\n")
    assert (await client.reply()).startswith(b"220 ")
    assert (await client.reply()).startswith(b"250")


async def test_smtps_reads_the_header_before_the_tls_handshake(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    tls_files: tuple[Any, Any, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    server = await start(nursery, make_config)
    client = await connect(server, "smtps")
    await client.send(v1("192.0.2.10"))
    context = ssl.create_default_context(cafile=str(tls_files[2]))
    await client.starttls(context, HOSTNAME)
    assert (await client.reply()).startswith(b"220 ")
    assert (await client.command(b"EHLO client.example")).startswith(b"250")
    tls = [
        getattr(r, "trio_mta_fields", {}) for r in caplog.records if r.getMessage() == "smtpd.tls"
    ]
    assert tls[-1]["client"] == "192.0.2.10"


class _HeaderInFirstWrite(trio.abc.Stream):
    """Sends the PROXY header in the same write as the client's first bytes."""

    def __init__(self, stream: trio.abc.Stream, header: bytes) -> None:
        self.stream, self.header = stream, header

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        header, self.header = self.header, b""
        await self.stream.send_all(header + bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.stream.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_smtps_client_hello_in_the_headers_segment_still_handshakes(
    nursery: trio.Nursery, make_config: Callable[..., Config], tls_files: tuple[Any, Any, Any]
) -> None:
    server = await start(nursery, make_config)
    raw = await trio.open_tcp_stream(*server.address("smtps"))
    client = RawClient(_HeaderInFirstWrite(raw, v2("192.0.2.11")))
    context = ssl.create_default_context(cafile=str(tls_files[2]))
    await client.starttls(context, HOSTNAME)
    assert (await client.reply()).startswith(b"220 ")


async def test_local_command_is_the_proxy_itself(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    """HAProxy's own health checks: LOCAL keeps the connection's address (trusted here)."""
    server = await start(nursery, make_config)
    client = await connect(server)
    await client.send(format_v2(ProxyHeader(2, "LOCAL")))
    assert (await relay_reply(client)).startswith(b"250")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"EHLO client.example\r\n", "not a PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "0x0a"),
        (V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x04\x00\x09\x00", "overruns"),
        (b"PROXY UNKNOWN\r\n", "names no client IP"),
        (format_v2(ProxyHeader(2, "PROXY", "UNIX")), "names no client IP"),
    ],
)
async def test_invalid_headers_close_without_a_banner(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    server = await start(nursery, make_config)
    client = await connect(server)
    await client.send(data)
    await assert_closed_without_banner(client)
    assert any(reason in str(fields["reason"]) for fields in refusals(caplog))


async def test_truncated_header_then_close_gets_no_banner(
    nursery: trio.Nursery, make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    server = await start(nursery, make_config)
    client = await connect(server)
    await client.send(v2("192.0.2.1")[:20])
    await client.stream.send_eof()  # type: ignore[attr-defined]
    await assert_closed_without_banner(client)
    assert any("closed before" in str(f["reason"]) for f in refusals(caplog))


async def test_a_header_that_never_completes_times_out_without_a_banner(
    nursery: trio.Nursery, make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    server = await start(nursery, make_config)
    server.state.proxy_header_timeout = 0.3
    silent = await connect(server)
    partial = await connect(server)
    await partial.send(b"PROXY TCP4 192.0.2.1 ")
    with trio.fail_after(5):
        await assert_closed_without_banner(silent)
        await assert_closed_without_banner(partial)
    assert sum("within 0.3s" in str(f["reason"]) for f in refusals(caplog)) == 2


async def test_a_peer_outside_proxy_from_is_closed_even_with_a_valid_header(
    nursery: trio.Nursery, make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mta")
    server = await start(
        nursery, make_config, listen=proxy_listeners(proxy_from=["192.0.2.0/24", "::1/128"])
    )
    for mode in ("smtp", "smtps"):
        client = await connect(server, mode)
        await client.send(v1("10.0.0.1"))
        await assert_closed_without_banner(client)
    assert [f["reason"] for f in refusals(caplog)] == ["peer not in proxy_from"] * 2
    assert refusals(caplog)[0]["peer"] == "127.0.0.1"


async def test_a_listener_without_proxy_protocol_takes_no_header(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    """A PROXY line on an ordinary listener is just a bad command, not a new identity."""
    server = await start(nursery, make_config, listen=[{"address": "127.0.0.1:0"}])
    client = await connect(server)
    assert (await client.reply()).startswith(b"220 ")
    assert (await client.command(v1("203.0.113.7")[:-2]))[:1] == b"5"


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ({"proxy_protocol": True}, "[[listen]][1].proxy_from: required when proxy_protocol"),
        (
            {"proxy_from": ["127.0.0.1/32"]},
            "[[listen]][1].proxy_from: only applies with proxy_protocol = true",
        ),
        (
            {"proxy_protocol": "yes", "proxy_from": ["x"]},
            "[[listen]][1].proxy_protocol: must be true or false",
        ),
        (
            {"proxy_protocol": True, "proxy_from": ["nonsense"]},
            "[[listen]][1].proxy_from[1]: must be an IP network",
        ),
    ],
)
def test_proxy_settings_errors_name_the_key(
    make_config: Callable[..., Config], listen: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(listen=[{"address": "127.0.0.1:0", **listen}])
    assert any(line.startswith(message) for line in info.value.errors), info.value.errors


def test_check_config_describes_a_proxy_listener(make_config: Callable[..., Config]) -> None:
    config = make_config(listen=proxy_listeners(proxy_from=["10.0.0.0/8", "::1"])[:1])
    assert config.describe_listeners() == [
        "127.0.0.1:0 smtp (STARTTLS, PROXY protocol from 10.0.0.0/8 ::1/128)"
    ]


def test_workers_get_the_proxy_settings_of_their_listeners(
    make_config: Callable[..., Config],
) -> None:
    """A supervised worker rebuilds its listeners from the parent's spec: a PROXY
    listener must stay one, or every header would become a bad command."""
    from trio_mta.workers.worker import ListenerFd, WorkerSpec

    config = make_config(listen=proxy_listeners(proxy_from=["10.0.0.0/8", "::1"]))
    spec = WorkerSpec(
        index=0,
        count=2,
        alive_fd=3,
        ready_fd=4,
        listeners=[ListenerFd.of(5 + i, listen) for i, listen in enumerate(config.listen)],
    )
    again = WorkerSpec.from_json(spec.to_json())
    assert [item.config() for item in again.listeners] == list(config.listen)
