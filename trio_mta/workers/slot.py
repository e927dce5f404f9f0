"""What a supervised worker is handed: its number, the worker count, its sockets."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from trio_mta.config import ListenConfig
from trio_mta.workers.secrets import KeyMaterial


@dataclass
class WorkerSlot:
    """``serve(config, worker=slot)`` runs as worker ``index`` of ``count``.

    ``listeners`` are already bound and listening (the parent bound them);
    ``metrics_channel`` is this worker's end of a socket pair on which the
    parent asks for its metrics, None when ``[metrics] listen`` is off.
    ``keys`` is the key material a parent that dropped root read for it.
    """

    index: int
    count: int
    listeners: list[tuple[ListenConfig, socket.socket]] = field(default_factory=list)
    metrics_channel: socket.socket | None = None
    # Set when the parent dropped root: the TLS pair and users file it read first.
    keys: KeyMaterial | None = None
