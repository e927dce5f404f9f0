"""The worker's side of the supervisor: ``python -m trio_mta _worker SPEC [serve flags]``.

SPEC is JSON the parent writes: this worker's number, the worker count, the
descriptors it inherited (listening sockets, the metrics channel) and two
pipes. The worker writes ``ready`` to one once it serves (its signal handlers
are installed by then, so the parent may forward signals), and watches the
other, whose write end only the parent holds: end-of-file means the parent
died, and the worker stops gracefully rather than serve unsupervised.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from trio_mta import log
from trio_mta.config import ListenConfig
from trio_mta.workers.secrets import KeyMaterial
from trio_mta.workers.slot import WorkerSlot

if TYPE_CHECKING:
    from trio_mta.mta import MTA

WORKER_COMMAND = "_worker"
READY = b"ready\n"


@dataclass
class ListenerFd:
    fd: int
    host: str
    port: int
    mode: str
    proxy_protocol: bool = False
    proxy_from: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, fd: int, listen: ListenConfig) -> ListenerFd:
        return cls(
            fd,
            listen.host,
            listen.port,
            listen.mode,
            listen.proxy_protocol,
            [str(network) for network in listen.proxy_from],
        )

    def config(self) -> ListenConfig:
        return ListenConfig(
            self.host,
            self.port,
            self.mode,  # type: ignore[arg-type]
            self.proxy_protocol,
            tuple(ipaddress.ip_network(n) for n in self.proxy_from),
        )


@dataclass
class WorkerSpec:
    index: int
    count: int
    alive_fd: int
    ready_fd: int
    metrics_fd: int | None = None
    listeners: list[ListenerFd] = field(default_factory=list)
    # Memory files with the key material, when the parent dropped root (workers/secrets.py).
    cert_fd: int | None = None
    key_fd: int | None = None
    users_fd: int | None = None
    users_signature: list[int] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data: dict[str, Any] = json.loads(text)
        listeners = [ListenerFd(**item) for item in data.pop("listeners")]
        return cls(**data, listeners=listeners)

    @property
    def fds(self) -> tuple[int, ...]:
        """Every descriptor the child must inherit."""
        own = [self.alive_fd, self.ready_fd, *(item.fd for item in self.listeners)]
        for fd in (self.metrics_fd, self.cert_fd, self.key_fd, self.users_fd):
            if fd is not None:
                own.append(fd)
        return tuple(dict.fromkeys(own))

    def slot(self) -> WorkerSlot:
        """The inherited descriptors as sockets, for ``serve(config, worker=...)``."""
        listeners = []
        for item in self.listeners:
            listeners.append((item.config(), socket.socket(fileno=item.fd)))
        metrics = None if self.metrics_fd is None else socket.socket(fileno=self.metrics_fd)
        keys = None
        if self.cert_fd is not None and self.key_fd is not None:
            keys = KeyMaterial.inherited(
                self.cert_fd, self.key_fd, self.users_fd, self.users_signature
            )
        return WorkerSlot(self.index, self.count, listeners, metrics, keys)


def notify_ready(spec: WorkerSpec) -> None:
    """Tell the parent this worker serves and has its signal handlers."""
    try:
        os.write(spec.ready_fd, READY)
    except OSError:
        pass  # the parent is gone; watch_parent stops us
    finally:
        os.close(spec.ready_fd)


async def watch_parent(spec: WorkerSpec, mta: MTA) -> None:
    """Stop gracefully once the parent's end of the alive pipe closes (it died)."""
    await trio.lowlevel.wait_readable(spec.alive_fd)
    log.warning("worker.parent_gone", parent=os.getppid())
    mta.stop()
