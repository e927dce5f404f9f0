"""DirectSocketStream: trio's stream contract over a socket that tries the call first."""

from __future__ import annotations

import os
import socket
import ssl

import pytest
import trio
import trio.testing
import trustme

from trio_mta.socket_stream import (
    CHECKPOINT_EVERY,
    DirectSocketStream,
    connect_ip,
    is_ip_literal,
)


def _pair() -> tuple[DirectSocketStream, DirectSocketStream]:
    a, b = socket.socketpair()
    return DirectSocketStream(a), DirectSocketStream(b)


async def test_eof_close_and_a_waiter_woken_by_close() -> None:
    """The parts of trio's stream contract the server relies on. (trio's own
    check_half_closeable_stream also demands a checkpoint on every call, which
    this stream gives up on purpose: see the module doc.)"""
    left, right = _pair()
    await left.send_all(b"last words")
    await left.send_eof()
    assert await right.receive_some(100) == b"last words"
    assert await right.receive_some(100) == b""  # EOF
    with pytest.raises(trio.BrokenResourceError):
        await left.send_all(b"after eof")  # EPIPE: the stream is broken, not closed
    await left.aclose()
    await right.aclose()

    _other, right = _pair()  # a peer that stays silent: the waiter really waits
    waiter_error: list[BaseException] = []

    async def waiter() -> None:
        try:
            await right.receive_some(10)
        except trio.ClosedResourceError as exc:
            waiter_error.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        await right.aclose()
    assert waiter_error
    with pytest.raises(trio.ClosedResourceError):
        await right.receive_some(1)
    await right.aclose()  # closing twice is fine


async def test_large_transfer_arrives_whole_and_in_order() -> None:
    left, right = _pair()
    payload = bytes(range(256)) * 40_000  # 10 MB: many EAGAINs on the sending side
    received = bytearray()

    async def reader() -> None:
        while len(received) < len(payload):
            received.extend(await right.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await left.send_all(payload)
    assert received == payload


async def test_a_peer_that_never_sends_is_cancelled_by_a_deadline() -> None:
    left, _right = _pair()
    with trio.move_on_after(0.2) as scope:
        await left.receive_some(10)
    assert scope.cancelled_caught


async def test_a_flooding_peer_cannot_starve_other_tasks() -> None:
    """Data always ready means no EAGAIN, yet another task still runs between reads."""
    left, right = _pair()
    await left.send_all(b"x" * (CHECKPOINT_EVERY * 50))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0)
        start = ticks
        for _ in range(CHECKPOINT_EVERY * 40):
            await right.receive_some(1)
        assert ticks - start >= 30
        nursery.cancel_scope.cancel()


async def test_a_ready_socket_still_honours_a_cancelled_scope() -> None:
    left, right = _pair()
    await left.send_all(b"y" * 10_000)
    calls = 0
    with trio.CancelScope() as scope:
        scope.cancel()
        for _ in range(CHECKPOINT_EVERY * 2):
            await right.receive_some(1)
            calls += 1
    assert calls < CHECKPOINT_EVERY
    assert scope.cancelled_caught


async def test_tls_runs_over_it() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    left, right = _pair()
    server = trio.SSLStream(left, server_ctx, server_side=True)
    client = trio.SSLStream(right, client_ctx, server_hostname="mx.test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    await client.send_all(b"EHLO over tls\r\n")
    assert await server.receive_some(100) == b"EHLO over tls\r\n"
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"late")


async def test_connect_ip_reaches_a_listener_over_ipv4_and_ipv6() -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.bind((host, 0))
            listener.listen()
            stream = await connect_ip(host, listener.getsockname()[1])
            peer, _ = listener.accept()
            with peer:
                await stream.send_all(b"ping")
                assert peer.recv(4) == b"ping"
                peer.sendall(b"pong")
                assert await stream.receive_some(4) == b"pong"
            await stream.aclose()


async def test_connect_ip_to_a_closed_port_raises_and_leaves_no_socket() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: refused
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ConnectionRefusedError):
            await connect_ip("127.0.0.1", port)
        assert len(os.listdir("/proc/self/fd")) == before


def test_ip_literals_are_told_from_names() -> None:
    assert is_ip_literal("127.0.0.1") and is_ip_literal("::1")
    assert not is_ip_literal("localhost") and not is_ip_literal("milter.example")
