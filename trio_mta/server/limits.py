"""Connection accounting for ``max_connections`` and ``max_connections_per_ip``.

Counted across every listener of the process, like Postfix's anvil(8): a
client cannot get around the per-IP limit by spreading over ports.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator


class ConnectionLimits:
    """Admission control; ``admit`` is a context manager held for a connection's life."""

    def __init__(self, max_connections: int, max_per_ip: int) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: Counter[str] = Counter()

    def reconfigure(self, max_connections: int, max_per_ip: int) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip

    def over_limit(self, ip: str) -> str | None:
        """Why a new connection from ``ip`` must be refused, or None."""
        if self.total >= self.max_connections:
            return "too many connections"
        if self._per_ip[ip] >= self.max_per_ip:
            return "too many connections from your address"
        return None

    @contextlib.contextmanager
    def admit(self, ip: str) -> Iterator[None]:
        self.total += 1
        self._per_ip[ip] += 1
        try:
            yield
        finally:
            self.total -= 1
            self._per_ip[ip] -= 1
            if not self._per_ip[ip]:
                del self._per_ip[ip]

    def count(self, ip: str) -> int:
        return self._per_ip[ip]
