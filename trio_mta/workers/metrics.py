"""Metrics over every worker: the parent asks each one and adds the answers up.

Why not prometheus-client's multiprocess mode: it swaps the value class of
the whole process (an embedding application's metrics too), needs a shared
folder of mmap files with cleanup when a worker dies, and cannot carry the
custom queue collector. Here each worker keeps its private registry as with
one process, and answers ``render()`` over a socket pair on request; the
parent's ``/metrics`` parses every answer and sums samples that carry the same
name and labels. A restarted worker starts from zero, so counters summed over
workers can step down after a crash: Prometheus' ``rate()`` treats that as a
counter reset, which it is. Gauges add up too (open connections, queue size),
except the age of the oldest queued message, which is the maximum.

The channel carries one request byte and answers of an 8-byte length and the
text exposition. A worker that does not answer in time is left out of that
scrape (and logged), so one stuck worker never blanks the others.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from trio_mta import log
from trio_mta.metrics import Metrics, _WithoutCreated

REQUEST = b"M"
_LENGTH = struct.Struct("!Q")
ANSWER_TIMEOUT = 5.0
MAX_OF = frozenset({"trio_mta_queue_oldest_age_seconds"})


async def answer_metrics_requests(metrics: Metrics, channel: socket.socket) -> None:
    """Worker side: render on each request until the parent closes its end.

    Nothing here may end the worker: a failed render answers an empty
    exposition, and a parent that dropped the channel just ends this task.
    """
    sock = trio.socket.from_stdlib_socket(channel)
    with sock:
        try:
            while await sock.recv(1):
                try:
                    body = await trio.to_thread.run_sync(metrics.render)
                except Exception as exc:
                    log.error("metrics.render_failed", error=f"{type(exc).__name__}: {exc}")
                    body = b""
                data = memoryview(_LENGTH.pack(len(body)) + body)
                while data:
                    data = data[await sock.send(data) :]
        except OSError:
            return


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(1 << 20, size - len(chunks)))
        if not chunk:
            raise ConnectionError("worker closed its metrics channel")
        chunks += chunk
    return bytes(chunks)


class _Merged:
    """Families of several expositions, same series summed (max for MAX_OF)."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self.values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            known = self.families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            values = self.values.setdefault(known.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in values and family.name in MAX_OF:
                    values[key] = max(values[key], sample.value)
                else:
                    values[key] = values.get(key, 0.0) + sample.value

    def collect(self) -> Iterator[Metric]:
        for name, family in self.families.items():
            out = Metric(family.name, family.documentation, family.type)
            for (sample_name, labels), value in self.values[name].items():
                out.add_sample(sample_name, dict(labels), value)
            yield out


class WorkerMetrics:
    """Parent side: ``render()`` (blocking, from the exporter's thread) over every worker."""

    def __init__(self, workers: int) -> None:
        self._channels: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        self._restarts = Counter(
            "trio_mta_worker_restarts",
            "Worker processes restarted after they died.",
            registry=self.registry,
        )
        self._workers = Gauge(
            "trio_mta_workers", "Worker processes serving now.", registry=self.registry
        )
        self._expected = Gauge(
            "trio_mta_workers_configured",
            "Worker processes [server] workers asks for.",
            registry=self.registry,
        )
        self._expected.set(workers)

    def attach(self, index: int, channel: socket.socket) -> None:
        """Worker ``index`` (re)started with this end of its channel; a blocking socket."""
        channel.settimeout(ANSWER_TIMEOUT)
        with self._lock:
            old = self._channels.pop(index, None)
            self._channels[index] = channel
            self._workers.set(len(self._channels))
        if old is not None:
            old.close()

    def detach(self, index: int) -> None:
        with self._lock:
            old = self._channels.pop(index, None)
            self._workers.set(len(self._channels))
        if old is not None:
            old.close()

    def restarted(self) -> None:
        self._restarts.inc()

    def close(self) -> None:
        for index in list(self._channels):
            self.detach(index)

    def render(self) -> bytes:
        merged = _Merged()
        with self._lock:
            channels = sorted(self._channels.items())
        for index, channel in channels:
            try:
                channel.sendall(REQUEST)
                (size,) = _LENGTH.unpack(_receive_exactly(channel, _LENGTH.size))
                merged.add(_receive_exactly(channel, size).decode("utf-8"))
            except (OSError, ValueError) as exc:
                # A half-read answer would desynchronise the channel: drop it; the
                # worker shows up again once restarted.
                log.warning(
                    "metrics.worker_unanswered", worker=index, error=f"{type(exc).__name__}: {exc}"
                )
                self.detach(index)
        return generate_latest(merged) + generate_latest(_WithoutCreated(self.registry))
