"""Prometheus metrics: counters the server and scheduler bump, served over HTTP on trio.

The registry and the text exposition format are prometheus-client's; what lives
here is the vocabulary (metric names and labels) and a deliberately tiny
HTTP/1.1 responder. Each :class:`Metrics` owns a private ``CollectorRegistry``
so several servers in one process (tests, embedding) never share values, and the
host application's global registry is left alone.

Recording calls are O(1) and do no I/O, so they are safe on the event loop's hot
paths. The one slow input, the queue's size and oldest age (an SQLite query), is
fetched at scrape time in a worker thread together with rendering.
"""

from __future__ import annotations

import copy
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol
from urllib.parse import urlsplit

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from trio_mta import log
from trio_mta.config.schema import format_host_port

__all__ = ["LATENCY_BUCKETS", "Metrics", "MetricsListenError", "Renderable", "serve_metrics"]

QueueStats = tuple[int, float | None]

# Mail latency spans a local Maildir write (milliseconds) to a remote host that
# defers for hours; the queue lifetime is days, so the top finite bucket is one.
LATENCY_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
    86400.0,
)

OUTCOMES = ("delivered", "deferred", "failed")
DESTINATIONS = ("local", "remote")
AUTH_METHODS = ("spf", "dkim", "dmarc")
AUTH_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# SPEC §10 tls_policy= names, and what one delivery attempt under each came to:
# "refused" is a host the policy ruled out (no match, TLSA failure) before connecting.
TLS_POLICIES = ("dane", "mta-sts", "verify", "required", "opportunistic", "none")
TLS_POLICY_OUTCOMES = ("delivered", "deferred", "failed", "mixed", "unreachable", "refused")
REJECT_REASONS = (
    "relay_denied",
    "unknown_user",
    "too_big",
    "bad_line_ending",
    "queue_error",
    "auth_required",
    "handler",
    "spf_fail",
    "dmarc_reject",
)

# ``generate_latest`` writes text format 0.0.4; recent prometheus-client releases
# point CONTENT_TYPE_LATEST at 1.0.0, which is not what that function produces.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class MetricsListenError(OSError):
    """``[metrics].listen`` could not be bound; the message names the setting and address.

    An OSError (what a failed bind is) rather than the server's ListenError so this
    module stays a leaf the server and scheduler can import without a cycle; the
    CLI already reports an OSError as one line.
    """


class _QueueCollector:
    """Queue gauges from a snapshot taken just before rendering, never on the event loop."""

    def __init__(self) -> None:
        self.snapshot: QueueStats | None = None

    def describe(self) -> Iterator[Metric]:
        # Lets the registry check names at registration without a snapshot.
        yield from self._families(0, None)

    def collect(self) -> Iterator[Metric]:
        if self.snapshot is not None:
            yield from self._families(*self.snapshot)

    @staticmethod
    def _families(size: int, oldest: float | None) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "trio_mta_queue_size",
            "Recipients in the queue not yet delivered or failed.",
            value=size,
        )
        # An empty queue reports age 0, so "oldest > 1h" alerts need no absent() guard.
        yield GaugeMetricFamily(
            "trio_mta_queue_oldest_age_seconds",
            "Age of the oldest queued message with pending recipients.",
            value=0.0 if oldest is None else oldest,
        )


class _WithoutCreated:
    """The registry minus ``*_created`` samples.

    Text format 0.0.4 turns them into a second gauge series per counter and
    histogram child: doubled cardinality for a start time nobody alerts on.
    prometheus-client's own switch for this is process-global, which would reach
    into an embedding application's metrics, so they are dropped here instead.
    """

    _TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            if metric.type in self._TYPES:
                trimmed = copy.copy(metric)
                trimmed.samples = [s for s in metric.samples if not s.name.endswith("_created")]
                yield trimmed
            else:
                yield metric


class Metrics:
    """Every metric trio_mta exports, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        reg = self.registry
        self._connections = Counter(
            "trio_mta_connections", "SMTP connections accepted.", ["listener", "tls"], registry=reg
        )
        self._open = Gauge(
            "trio_mta_connections_open", "SMTP connections open now.", ["listener"], registry=reg
        )
        self._accepted = Counter(
            "trio_mta_messages_accepted",
            "Messages accepted (250 after DATA/BDAT).",
            ["listener"],
            registry=reg,
        )
        self._accepted_bytes = Counter(
            "trio_mta_messages_accepted_bytes",
            "Size of accepted messages.",
            ["listener"],
            registry=reg,
        )
        self._rejected = Counter(
            "trio_mta_messages_rejected",
            "Messages or recipients refused, by reason.",
            ["reason"],
            registry=reg,
        )
        self._recipients = Counter(
            "trio_mta_recipients",
            "Recipient delivery attempts by outcome and destination.",
            ["outcome", "destination"],
            registry=reg,
        )
        self._latency = Histogram(
            "trio_mta_delivery_latency_seconds",
            "Time from acceptance to successful delivery.",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._tls_failed = Counter(
            "trio_mta_tls_handshake_failures",
            "TLS handshakes that failed, by listener.",
            ["listener"],
            registry=reg,
        )
        self._auth = Counter(
            "trio_mta_auth_attempts", "SMTP AUTH attempts by result.", ["result"], registry=reg
        )
        self._mail_auth = Counter(
            "trio_mta_mail_auth_results",
            "SPF, DKIM (one per signature) and DMARC results on inbound mail (SPEC §9).",
            ["method", "result"],
            registry=reg,
        )
        self._tls_policy = Counter(
            "trio_mta_tls_policy_attempts",
            "Outbound delivery attempts (one per host and address) by TLS policy and outcome.",
            ["policy", "outcome"],
            registry=reg,
        )
        self._queue = _QueueCollector()
        reg.register(self._queue)
        self._queue_source: Callable[[], QueueStats] | None = None
        self._render_lock = threading.Lock()
        self._exposed = _WithoutCreated(reg)
        # Series that exist from the start read 0 instead of being absent, so
        # rate() and alerts work before the first event of each kind.
        for outcome in OUTCOMES:
            for destination in DESTINATIONS:
                self._recipients.labels(outcome, destination)
        for destination in DESTINATIONS:
            self._latency.labels(destination)
        for reason in REJECT_REASONS:
            self._rejected.labels(reason)
        for result in ("success", "failure"):
            self._auth.labels(result)
        for method in AUTH_METHODS:
            for result in AUTH_RESULTS:
                if method == "spf" or result not in ("softfail",):
                    self._mail_auth.labels(method, result)
        for policy in TLS_POLICIES:
            for outcome in TLS_POLICY_OUTCOMES:
                self._tls_policy.labels(policy, outcome)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: prometheus_client's ``labels()`` checks and
        locks on every call, which showed in the per-message profile."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def connection_opened(self, listener: str, tls: bool) -> None:
        self._child(self._connections, listener, "true" if tls else "false").inc()
        self._child(self._open, listener).inc()

    def connection_closed(self, listener: str) -> None:
        self._child(self._open, listener).dec()

    def message_accepted(self, listener: str, size: int) -> None:
        self._child(self._accepted, listener).inc()
        self._child(self._accepted_bytes, listener).inc(size)

    def message_rejected(self, reason: str) -> None:
        """``reason`` should be one of REJECT_REASONS; others are counted as given."""
        self._child(self._rejected, reason).inc()

    def recipient_outcome(self, kind: str, destination: str) -> None:
        """Count one recipient's attempt; a label outside the contract is a caller bug."""
        if kind not in OUTCOMES or destination not in DESTINATIONS:
            raise ValueError(
                f"recipient_outcome({kind!r}, {destination!r}): "
                f"kind must be one of {OUTCOMES}, destination one of {DESTINATIONS}"
            )
        self._child(self._recipients, kind, destination).inc()

    def delivery_latency(self, destination: str, seconds: float) -> None:
        if destination not in DESTINATIONS:
            raise ValueError(f"delivery_latency: destination must be one of {DESTINATIONS}")
        # A clock step backwards must not record a negative latency.
        self._child(self._latency, destination).observe(max(0.0, seconds))

    def tls_policy_attempt(self, policy: str, outcome: str) -> None:
        """One delivery attempt's ``tls_policy=`` and outcome (SPEC §10)."""
        if policy not in TLS_POLICIES or outcome not in TLS_POLICY_OUTCOMES:
            raise ValueError(
                f"tls_policy_attempt({policy!r}, {outcome!r}): policy must be one "
                f"of {TLS_POLICIES}, outcome one of {TLS_POLICY_OUTCOMES}"
            )
        self._tls_policy.labels(policy, outcome).inc()

    def set_queue_stats_source(self, fn: Callable[[], QueueStats]) -> None:
        """``fn`` returns (recipients pending, oldest age in seconds or None); runs in a thread."""
        self._queue_source = fn

    def tls_handshake_failed(self, listener: str) -> None:
        self._child(self._tls_failed, listener).inc()

    def auth_result(self, ok: bool) -> None:
        self._child(self._auth, "success" if ok else "failure").inc()

    def mail_auth_result(self, method: str, result: str) -> None:
        """One SPF, DKIM or DMARC verdict; results outside RFC 8601's words are caller bugs."""
        if method not in AUTH_METHODS or result not in AUTH_RESULTS:
            raise ValueError(f"mail_auth_result({method!r}, {result!r})")
        self._child(self._mail_auth, method, result).inc()

    def render(self) -> bytes:
        """The text exposition, queue stats fetched first. Blocking: call from a thread.

        A failing queue source leaves the queue gauges out and logs; the rest of
        the scrape still succeeds, so one locked database does not blank every
        other series (which a 500 would do: Prometheus drops a failed scrape whole).
        """
        with self._render_lock:
            snapshot: QueueStats | None = None
            source = self._queue_source
            if source is not None:
                try:
                    snapshot = source()
                except Exception as exc:
                    log.warning("metrics.queue_stats_failed", error=f"{type(exc).__name__}: {exc}")
            self._queue.snapshot = snapshot
            try:
                return generate_latest(self._exposed)
            finally:
                self._queue.snapshot = None


# --- HTTP ---------------------------------------------------------------------------

MAX_HEAD = 8192
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
DRAIN_TIMEOUT = 1.0
MAX_CONNECTIONS = 32

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _parse_head(head: bytes) -> tuple[bytes, str]:
    """(method, path) from a request head without its blank line (RFC 9112 §2-§5).

    Only what routing needs is extracted; the rest is checked for shape so that
    garbage is a 400 rather than a guess. Bare LF line ends are tolerated (§2.2).
    """
    lines = [line.removesuffix(b"\r") for line in head.split(b"\n")]
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _VERSION.fullmatch(parts[2]):
        raise _BadRequest(400)
    method, target, version = parts
    if not target.isascii() or any(c <= 0x20 or c == 0x7F for c in target):
        raise _BadRequest(400)
    absolute = target[:7].lower() == b"http://" or target[:8].lower() == b"https://"
    if not (absolute or target.startswith(b"/")) or target.startswith(b"//"):
        raise _BadRequest(400)
    try:
        path = urlsplit(target.decode("ascii")).path  # absolute-form too, §3.2.2
    except ValueError:  # e.g. "http://[broken/metrics"
        raise _BadRequest(400) from None
    has_host = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # No obs-fold, no whitespace before the colon (§5.1, §5.2).
        if not colon or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise _BadRequest(400)
        has_host = has_host or name.lower() == b"host"
    if version == b"HTTP/1.1" and not has_host:
        raise _BadRequest(400)  # RFC 9112 §3.2: MUST
    return method, path


async def _read_head(stream: trio.abc.Stream) -> bytes | None:
    """Bytes up to the blank line, at most MAX_HEAD; None if the peer closed without a byte."""
    buf = bytearray()
    while True:
        ends = [at for at in (buf.find(b"\r\n\r\n"), buf.find(b"\n\n")) if at >= 0]
        if ends:
            return bytes(buf[: min(ends)])
        if len(buf) > MAX_HEAD:
            raise _BadRequest(431)
        chunk = await stream.receive_some(MAX_HEAD + 1 - len(buf))
        if not chunk:
            if buf:
                raise _BadRequest(400)  # half a request, then EOF
            return None
        buf += chunk


def _response(
    status: int,
    body: bytes = b"",
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: str = "",
    head_only: bool = False,
) -> bytes:
    header = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return header.encode("ascii") + (b"" if head_only else body)


class Renderable(Protocol):
    """What ``/metrics`` serves: one process's :class:`Metrics`, or a sum over workers."""

    def render(self) -> bytes:
        """The text exposition; blocking, called from a thread."""
        ...


class _Exporter:
    def __init__(self, metrics: Renderable, read_timeout: float) -> None:
        self.metrics = metrics
        self.read_timeout = read_timeout
        self.slots = trio.Semaphore(MAX_CONNECTIONS)
        # One render at a time: concurrent scrapes queue here instead of piling
        # threads onto the queue database.
        self.render_limiter = trio.CapacityLimiter(1)

    async def respond(self, stream: trio.abc.Stream) -> bytes:
        """The whole response for one request, or b"" when the peer left without one."""
        try:
            # One deadline for the whole head, so a client dribbling a byte at a
            # time cannot hold its slot longer than a silent one.
            with trio.move_on_after(self.read_timeout) as scope:
                head = await _read_head(stream)
            if scope.cancelled_caught:
                return _response(408, b"request timeout\n")
            if head is None:
                return b""
            method, path = _parse_head(head)
        except _BadRequest as exc:
            return _response(exc.status, f"{_REASONS[exc.status].lower()}\n".encode())
        if path != "/metrics":
            return _response(404, b"not found; metrics are at /metrics\n")
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"method not allowed\n", extra="Allow: GET, HEAD\r\n")
        try:
            body = await trio.to_thread.run_sync(self.metrics.render, limiter=self.render_limiter)
        except Exception as exc:
            # A broken collector is a bug to log; the scraper sees an honest 500.
            log.error("metrics.render_failed", error=f"{type(exc).__name__}: {exc}")
            return _response(500, b"internal error rendering metrics\n")
        return _response(200, body, content_type=CONTENT_TYPE, head_only=method == b"HEAD")

    async def handle(self, stream: trio.SocketStream) -> None:
        """One request per connection; every failure ends only this connection."""
        try:
            async with stream:
                reply = await self.respond(stream)
                if not reply:
                    return
                with trio.move_on_after(WRITE_TIMEOUT):
                    await stream.send_all(reply)
                    await stream.send_eof()
                    # Read what the client still sends until it closes, so unread
                    # request bytes do not turn our close into a RST that could
                    # destroy the response in flight (RFC 9112 §9.6).
                    with trio.move_on_after(DRAIN_TIMEOUT):
                        while await stream.receive_some(MAX_HEAD):
                            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception as exc:
            log.error("metrics.http_error", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.slots.release()

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    log.error("metrics.accept_failed", error=str(exc))
                    await trio.sleep(0.1)
                    continue
                try:
                    self.slots.acquire_nowait()
                except trio.WouldBlock:
                    # Full: refuse at once rather than let idle sockets eat the
                    # file descriptors the SMTP listeners share with us.
                    await stream.aclose()
                    continue
                nursery.start_soon(self.handle, stream)


async def _bind(host: str, port: int) -> trio.SocketListener:
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        sock = trio.socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
            await sock.bind(sockaddr)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise MetricsListenError(
            f"cannot listen on {format_host_port(host, port)} ([metrics].listen): {reason}"
        ) from None
    return trio.SocketListener(sock)


async def serve_metrics(
    metrics: Renderable,
    host: str,
    port: int,
    *,
    read_timeout: float = READ_TIMEOUT,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on host:port until cancelled; started((host, bound port)).

    Binding happens before ``started`` so a bad ``[metrics].listen`` is a one-line
    :class:`MetricsListenError`, not a traceback from a background task.
    """
    listener = await _bind(host, port)
    bound_port: int = listener.socket.getsockname()[1]
    exporter = _Exporter(metrics, read_timeout)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exporter.accept_loop, listener, nursery)
        log.event("metrics.listening", address=format_host_port(host, bound_port))
        task_status.started((host, bound_port))
