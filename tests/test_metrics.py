"""Metrics: recording calls move the right series, and the trio HTTP endpoint
answers real HTTP clients while shrugging off bad ones."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import urllib.error
import urllib.request

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from trio_mta.metrics import (
    LATENCY_BUCKETS,
    MAX_CONNECTIONS,
    Metrics,
    MetricsListenError,
    _BadRequest,
    _parse_head,
    serve_metrics,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    """Every sample keyed by (name, labels), through prometheus-client's own parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


async def _start(nursery: trio.Nursery, metrics: Metrics, read_timeout: float = 10.0) -> int:
    address: tuple[str, int] = await nursery.start(
        lambda task_status: serve_metrics(
            metrics, "127.0.0.1", 0, read_timeout=read_timeout, task_status=task_status
        )
    )
    assert address[0] == "127.0.0.1" and address[1] > 0
    return address[1]


def _get(port: int, path: str = "/metrics") -> tuple[int, dict[str, str], str]:
    """A scrape with urllib, as any HTTP client would do it."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read().decode()


async def _scrape(port: int, path: str = "/metrics") -> tuple[int, dict[str, str], str]:
    return await trio.to_thread.run_sync(_get, port, path)


def _raw(port: int, request: bytes, *, shut_write: bool = False) -> bytes:
    """Send bytes as they are and read the whole answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def _raw_async(port: int, request: bytes, *, shut_write: bool = False) -> bytes:
    return await trio.to_thread.run_sync(lambda: _raw(port, request, shut_write=shut_write))


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_counters_move_with_labels(nursery: trio.Nursery) -> None:
    metrics = Metrics()
    port = await _start(nursery, metrics)
    _, _, before = await _scrape(port)
    samples = _parse(before)
    # Series that exist before any event read 0 rather than being absent.
    assert samples[_key("trio_mta_recipients_total", outcome="failed", destination="remote")] == 0
    assert samples[_key("trio_mta_messages_rejected_total", reason="relay_denied")] == 0
    assert _key("trio_mta_connections_total", listener="smtp", tls="false") not in samples

    metrics.connection_opened("smtp", tls=False)
    metrics.connection_opened("smtp", tls=False)
    metrics.connection_opened("submission", tls=True)
    metrics.connection_closed("smtp")
    metrics.message_accepted("smtp", 1200)
    metrics.message_accepted("smtp", 300)
    metrics.message_rejected("relay_denied")
    metrics.message_rejected("too_big")
    metrics.message_rejected("too_big")
    metrics.recipient_outcome("delivered", "local")
    metrics.recipient_outcome("deferred", "remote")
    metrics.recipient_outcome("deferred", "remote")
    metrics.tls_handshake_failed("smtps")
    metrics.auth_result(True)
    metrics.auth_result(False)
    metrics.auth_result(False)

    status, headers, text = await _scrape(port)
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["Connection"] == "close"
    after = _parse(text)
    expected = {
        _key("trio_mta_connections_total", listener="smtp", tls="false"): 2,
        _key("trio_mta_connections_total", listener="submission", tls="true"): 1,
        _key("trio_mta_connections_open", listener="smtp"): 1,
        _key("trio_mta_connections_open", listener="submission"): 1,
        _key("trio_mta_messages_accepted_total", listener="smtp"): 2,
        _key("trio_mta_messages_accepted_bytes_total", listener="smtp"): 1500,
        _key("trio_mta_messages_rejected_total", reason="relay_denied"): 1,
        _key("trio_mta_messages_rejected_total", reason="too_big"): 2,
        _key("trio_mta_messages_rejected_total", reason="unknown_user"): 0,
        _key("trio_mta_recipients_total", outcome="delivered", destination="local"): 1,
        _key("trio_mta_recipients_total", outcome="deferred", destination="remote"): 2,
        _key("trio_mta_recipients_total", outcome="failed", destination="remote"): 0,
        _key("trio_mta_tls_handshake_failures_total", listener="smtps"): 1,
        _key("trio_mta_auth_attempts_total", result="success"): 1,
        _key("trio_mta_auth_attempts_total", result="failure"): 2,
    }
    assert {key: after.get(key) for key in expected} == expected
    # Start-time series are left out (see _WithoutCreated).
    assert not any(name.endswith("_created") for name, _ in after)


async def test_latency_histogram_buckets(nursery: trio.Nursery) -> None:
    metrics = Metrics()
    port = await _start(nursery, metrics)
    metrics.delivery_latency("local", 0.003)
    metrics.delivery_latency("local", 0.2)
    metrics.delivery_latency("remote", 4000.0)
    metrics.delivery_latency("remote", -1.0)  # clock stepped back: counted as 0
    samples = _parse((await _scrape(port))[2])

    def bucket(destination: str, le: str) -> float:
        return samples[
            _key("trio_mta_delivery_latency_seconds_bucket", destination=destination, le=le)
        ]

    for destination in ("local", "remote"):
        for bound in LATENCY_BUCKETS:
            bucket(destination, repr(float(bound)))  # every bucket is exported
    assert LATENCY_BUCKETS[0] == 0.01 and LATENCY_BUCKETS[-1] >= 3600
    assert bucket("local", "0.01") == 1
    assert bucket("local", "0.1") == 1
    assert bucket("local", "0.25") == 2
    assert bucket("local", "+Inf") == 2
    assert bucket("remote", "0.01") == 1
    assert bucket("remote", "3600.0") == 1
    assert bucket("remote", "7200.0") == 2
    assert samples[_key("trio_mta_delivery_latency_seconds_count", destination="remote")] == 2
    assert samples[
        _key("trio_mta_delivery_latency_seconds_sum", destination="local")
    ] == pytest.approx(0.203)


async def test_queue_gauges_from_source_off_the_event_loop(nursery: trio.Nursery) -> None:
    metrics = Metrics()
    port = await _start(nursery, metrics)
    samples = _parse((await _scrape(port))[2])
    assert _key("trio_mta_queue_size") not in samples  # no queue, no gauge

    loop_thread = threading.get_ident()
    calls: list[int] = []
    state: dict[str, tuple[int, float | None]] = {"stats": (7, 93.5)}

    def source() -> tuple[int, float | None]:
        calls.append(threading.get_ident())
        return state["stats"]

    metrics.set_queue_stats_source(source)
    samples = _parse((await _scrape(port))[2])
    assert samples[_key("trio_mta_queue_size")] == 7
    assert samples[_key("trio_mta_queue_oldest_age_seconds")] == 93.5
    assert calls and loop_thread not in calls

    state["stats"] = (0, None)
    samples = _parse((await _scrape(port))[2])
    assert samples[_key("trio_mta_queue_size")] == 0
    assert samples[_key("trio_mta_queue_oldest_age_seconds")] == 0


async def test_failing_queue_source_keeps_the_rest(nursery: trio.Nursery) -> None:
    metrics = Metrics()
    port = await _start(nursery, metrics)

    def broken() -> tuple[int, float | None]:
        raise RuntimeError("database is locked")

    metrics.set_queue_stats_source(broken)
    metrics.auth_result(True)
    status, _, text = await _scrape(port)
    assert status == 200
    samples = _parse(text)
    assert _key("trio_mta_queue_size") not in samples
    assert samples[_key("trio_mta_auth_attempts_total", result="success")] == 1


async def test_instances_do_not_share_values(nursery: trio.Nursery) -> None:
    first, second = Metrics(), Metrics()
    port_a = await _start(nursery, first)
    port_b = await _start(nursery, second)
    first.message_rejected("unknown_user")
    first.connection_opened("smtp", tls=True)
    a = _parse((await _scrape(port_a))[2])
    b = _parse((await _scrape(port_b))[2])
    assert a[_key("trio_mta_messages_rejected_total", reason="unknown_user")] == 1
    assert b[_key("trio_mta_messages_rejected_total", reason="unknown_user")] == 0
    assert _key("trio_mta_connections_total", listener="smtp", tls="true") in a
    assert _key("trio_mta_connections_total", listener="smtp", tls="true") not in b


def test_recipient_labels_outside_the_contract_are_refused() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="kind must be one of"):
        metrics.recipient_outcome("bounced", "local")
    with pytest.raises(ValueError):
        metrics.recipient_outcome("delivered", "mars")
    with pytest.raises(ValueError):
        metrics.delivery_latency("mars", 1.0)


async def test_not_found_and_wrong_method(nursery: trio.Nursery) -> None:
    port = await _start(nursery, Metrics())
    status, _, body = await _scrape(port, "/")
    assert status == 404 and "/metrics" in body

    def post() -> tuple[int, str | None, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("POST", "/metrics", body=b"x=1" * 2000)
            response = connection.getresponse()
            return response.status, response.getheader("Allow"), response.read()
        finally:
            connection.close()

    status_post, allow, _ = await trio.to_thread.run_sync(post)
    assert (status_post, allow) == (405, "GET, HEAD")

    # A query string does not change the resource; HEAD has the headers, no body.
    answer = await _raw_async(port, b"HEAD /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body_bytes = answer.partition(b"\r\n\r\n")
    assert _status(answer) == 200 and body_bytes == b""
    assert b"Content-Length: 0" not in head


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9 shape
        (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /metrics HTTP/2.0\r\nHost: a\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost : a\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n", 400),
        (b"GET /m\xe9trics HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET http://[x/metrics HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET //metrics HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.0\n\n", 200),  # bare LF, no Host needed in 1.0
        (b"GET http://h/metrics HTTP/1.1\r\nHost: h\r\n\r\n", 200),  # absolute-form
    ],
)
async def test_garbage_gets_an_error_not_a_crash(
    nursery: trio.Nursery, request_bytes: bytes, status: int
) -> None:
    metrics = Metrics()
    port = await _start(nursery, metrics)
    answer = await _raw_async(port, request_bytes)
    assert _status(answer) == status
    assert b"\r\nConnection: close\r\n" in answer
    # The server is still there for a proper scrape.
    assert (await _scrape(port))[0] == 200


def _joined(*parts: bytes, max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(parts), max_size=max_size).map(b"".join)


# Requests shaped like HTTP with hostile pieces, where plain random bytes would
# almost never get past the request line.
_TARGETS = st.tuples(
    st.sampled_from([b"", b"/", b"http://", b"HTTPS://", b"//"]),
    _joined(
        b"/",
        b"metrics",
        b"[",
        b"[",
        b"]",
        b"?",
        b"#",
        b"%",
        b":",
        b"@",
        b"\xff",
        b"\x7f",
        max_size=6,
    ),
).map(b"".join)
_FIELDS = _joined(b"Host", b"X", b":", b" ", b"\t", b"a", b"\x00", b"\xff", b"\r", max_size=6)
_REQUESTS = st.builds(
    lambda method, target, version, fields, eol: (
        b" ".join((method, target, version)) + b"".join(eol + f for f in fields)
    ),
    st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"G\x00T", b""]),
    _TARGETS,
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"http/1.1"]),
    st.lists(_FIELDS, max_size=3),
    st.sampled_from([b"\r\n", b"\n"]),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=200), _REQUESTS))
def test_any_head_parses_or_is_a_bad_request(head: bytes) -> None:
    """Whatever arrives, the parser answers (method, path) or a 4xx, never another exception."""
    try:
        method, path = _parse_head(head)
    except _BadRequest as exc:
        assert exc.status == 400
    else:
        assert method and (path == "" or path.startswith("/"))


async def test_half_a_request_then_eof(nursery: trio.Nursery) -> None:
    port = await _start(nursery, Metrics())
    assert _status(await _raw_async(port, b"GET /metr", shut_write=True)) == 400
    assert await _raw_async(port, b"", shut_write=True) == b""
    assert (await _scrape(port))[0] == 200


async def test_silent_and_slow_clients(nursery: trio.Nursery) -> None:
    port = await _start(nursery, Metrics(), read_timeout=0.5)
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    dribbler = await trio.open_tcp_stream("127.0.0.1", port)

    async def dribble() -> None:
        # A byte every 0.1 s never completes a head; the deadline covers the
        # whole head, so this cannot extend its stay past read_timeout.
        for byte in b"GET /metrics HTTP/1.1\r\nHost: a\r\n":
            try:
                await dribbler.send_all(bytes([byte]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep(0.1)

    async def answer_of(stream: trio.SocketStream) -> bytes:
        data = b""
        with trio.fail_after(3):
            while chunk := await stream.receive_some(4096):
                data += chunk
        return data

    async with trio.open_nursery() as dribbling:
        dribbling.start_soon(dribble)
        assert (await _scrape(port))[0] == 200  # others are served meanwhile
        start = trio.current_time()
        assert _status(await answer_of(silent)) == 408
        assert _status(await answer_of(dribbler)) == 408
        assert trio.current_time() - start < 2.5
        dribbling.cancel_scope.cancel()
    await silent.aclose()
    await dribbler.aclose()
    assert (await _scrape(port))[0] == 200


async def test_bind_failure_names_the_setting(nursery: trio.Nursery) -> None:
    port = await _start(nursery, Metrics())
    with pytest.raises(MetricsListenError) as info:
        await serve_metrics(Metrics(), "127.0.0.1", port)
    message = str(info.value)
    assert "[metrics].listen" in message and f"127.0.0.1:{port}" in message
    assert "\n" not in message
    assert isinstance(info.value, OSError)


async def test_cancellation_stops_serving() -> None:
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, metrics)
        assert (await _scrape(port))[0] == 200
        nursery.cancel_scope.cancel()
    with pytest.raises(OSError):
        await trio.to_thread.run_sync(lambda: socket.create_connection(("127.0.0.1", port), 2))


async def test_connection_cap_refuses_instead_of_queueing(nursery: trio.Nursery) -> None:
    port = await _start(nursery, Metrics(), read_timeout=0.5)
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
    await trio.sleep(0.05)  # let the server accept them all
    extra = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(0.4):  # closed at once, well before any read timeout
        with contextlib.suppress(trio.BrokenResourceError):  # a reset is as good as a close
            assert await extra.receive_some(4096) == b""
    await extra.aclose()
    for stream in idle:  # each got its 408 and freed its slot
        with trio.fail_after(3):
            assert _status(await stream.receive_some(4096)) == 408
        await stream.aclose()
    assert (await _scrape(port))[0] == 200


async def test_a_broken_collector_is_a_500_not_a_crash(nursery: trio.Nursery) -> None:
    metrics = Metrics()
    port = await _start(nursery, metrics)

    class Broken:
        def describe(self) -> list[Metric]:
            return []

        def collect(self) -> list[Metric]:
            raise RuntimeError("bug")

    broken = Broken()
    metrics.registry.register(broken)
    assert (await _scrape(port))[0] == 500
    metrics.registry.unregister(broken)
    assert (await _scrape(port))[0] == 200
