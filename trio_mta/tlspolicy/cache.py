"""MTA-STS policies over time: discovery, refetch rules and the durable cache (RFC 8461 §3.3, §5.1).

A fetched policy is kept in memory and in ``<state_dir>/mta-sts/DOMAIN.json``
(write, fsync, rename), so a restart does not forget an ``enforce`` policy and
an attacker who blocks the policy host afterwards gains nothing until the
policy's ``max_age`` has passed. The rules, per lookup:

- an expired entry (older than its ``max_age``) is as good as none;
- no ``_mta-sts`` TXT record, or a DNS failure: the unexpired cached policy applies;
- a TXT ``id`` other than the cached one, or a cached policy past half its
  ``max_age`` (at most a day: RFC 8461 §10.2 asks senders to refresh before
  expiry), is refetched; a failed refetch keeps the cached policy and is not
  retried for a few minutes, so a dead policy host does not slow every delivery.
"""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from trio_mta import log
from trio_mta.dns import DnsError, Resolver
from trio_mta.safeio import replace_file
from trio_mta.tlspolicy.fetch import FetchError, fetch_policy
from trio_mta.tlspolicy.sts import StsError, StsPolicy, choose_txt, parse_policy

__all__ = ["CachedPolicy", "PolicyCache", "StsSource", "StsState"]

_REFRESH_MAX: Final = 86400.0  # refresh a long-lived policy at least daily
_RETRY_FAILED: Final = 300.0  # after a failed fetch, this long before trying again
_SAFE_NAME: Final = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?\Z")
_FORMAT: Final = 1
_MEMORY_ENTRIES: Final = 10_000


@dataclass(frozen=True)
class CachedPolicy:
    """One domain's policy as fetched: the TXT id it was fetched for, and when."""

    domain: str
    id: str
    policy: StsPolicy
    text: str
    fetched_at: float  # unix time

    def age(self, now: float) -> float:
        return max(0.0, now - self.fetched_at)

    def expired(self, now: float) -> bool:
        return self.age(now) >= self.policy.max_age

    def refresh_due(self, now: float) -> bool:
        return self.age(now) >= min(self.policy.max_age / 2, _REFRESH_MAX)


@dataclass(frozen=True)
class StsState:
    """What MTA-STS says about a domain right now; ``cached`` None means no policy.

    ``note`` says how it was found ("fetched", "cached", or why there is none),
    for the log line and ``trio-mta tls-policy``.
    """

    cached: CachedPolicy | None
    note: str
    txt_id: str | None = None

    @property
    def policy(self) -> StsPolicy | None:
        return self.cached.policy if self.cached is not None else None


class PolicyCache:
    """Policies by domain in memory, backed by one JSON file each (``folder`` None: memory)."""

    def __init__(self, folder: Path | None) -> None:
        self._folder = folder
        self._memory: dict[str, CachedPolicy | None] = {}

    def _path(self, domain: str) -> Path | None:
        if self._folder is None or not _SAFE_NAME.match(domain) or ".." in domain:
            return None
        return self._folder / f"{domain}.json"

    async def get(self, domain: str) -> CachedPolicy | None:
        if domain not in self._memory:
            path = self._path(domain)
            entry = None if path is None else await trio.to_thread.run_sync(_load, path, domain)
            self._remember(domain, entry)
        return self._memory.get(domain)

    def _remember(self, domain: str, entry: CachedPolicy | None) -> None:
        """Keep at most _MEMORY_ENTRIES domains in memory (the oldest go; disk keeps them)."""
        self._memory.pop(domain, None)
        self._memory[domain] = entry
        while len(self._memory) > _MEMORY_ENTRIES:
            del self._memory[next(iter(self._memory))]

    async def put(self, entry: CachedPolicy) -> None:
        self._remember(entry.domain, entry)
        path = self._path(entry.domain)
        if path is None:
            return
        record = {
            "format": _FORMAT,
            "domain": entry.domain,
            "id": entry.id,
            "fetched_at": entry.fetched_at,
            "policy": entry.text,
        }
        data = json.dumps(record, indent=1).encode()
        try:
            await trio.to_thread.run_sync(_store, path, data)
        except OSError as exc:
            # The policy still applies from memory; only a restart would lose it.
            log.warning(
                "mta_sts.cache_write_failed",
                domain=entry.domain,
                path=str(path),
                error=exc.strerror or str(exc),
            )


def _store(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    replace_file(path, data, mode=0o600)


def _load(path: Path, domain: str) -> CachedPolicy | None:
    """The entry in *path*, or None when absent or unreadable (logged: it is ignored)."""
    try:
        record = json.loads(path.read_bytes())
        if record.get("format") != _FORMAT or record.get("domain") != domain:
            raise ValueError("not a policy cache entry for this domain")
        text, fetched_at, txt_id = record["policy"], record["fetched_at"], record["id"]
        if not (
            isinstance(text, str)
            and isinstance(txt_id, str)
            and isinstance(fetched_at, int | float)
        ):
            raise ValueError("fields of the wrong type")
        return CachedPolicy(domain, txt_id, parse_policy(text), text, float(fetched_at))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("mta_sts.cache_unreadable", domain=domain, path=str(path), error=str(exc))
        return None


class StsSource:
    """Finds the MTA-STS policy of a domain: TXT, cache, fetch, in RFC 8461 §5.1 order."""

    def __init__(
        self,
        resolver: Resolver,
        cache: PolicyCache,
        context: Callable[[], ssl.SSLContext],
        *,
        port: int = 443,
        fetch_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._resolver = resolver
        self._cache = cache
        self._context = context
        self._port = port
        self._fetch_timeout = fetch_timeout
        self._clock = clock
        self._retry_after: dict[str, float] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def lookup(self, domain: str, *, store: bool = True) -> StsState:
        """The policy that applies to *domain* now. *store* False: never write the cache
        (``trio-mta tls-policy`` looks without touching the server's state)."""
        domain = domain.lower().rstrip(".")
        lock = self._locks.setdefault(domain, trio.Lock())
        try:
            async with lock:  # one fetch per domain at a time; the others reuse its result
                return await self._lookup(domain, store)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(domain, None)

    async def _lookup(self, domain: str, store: bool) -> StsState:
        now = self._clock()
        cached = await self._cache.get(domain)
        if cached is not None and cached.expired(now):
            cached = None
        try:
            record = choose_txt(await self._resolver.txt(f"_mta-sts.{domain}"))
            problem = "" if record is not None else "no _mta-sts TXT record"
        except (DnsError, StsError) as exc:
            record, problem = None, f"_mta-sts TXT: {exc}"
        if record is None:
            if cached is not None:
                return StsState(cached, f"cached ({problem})")
            return StsState(None, problem)
        if cached is not None and cached.id == record.id and not cached.refresh_due(now):
            return StsState(cached, "cached", record.id)
        if self._retry_after.get(domain, 0.0) > now:
            if cached is not None:
                return StsState(cached, "cached (a recent refetch failed)", record.id)
            return StsState(None, "a recent policy fetch failed", record.id)
        try:
            text = await fetch_policy(
                domain,
                resolver=self._resolver,
                context=self._context(),
                port=self._port,
                timeout=self._fetch_timeout,
            )
            policy = parse_policy(text)
        except (FetchError, StsError) as exc:
            self._retry_after[domain] = now + _RETRY_FAILED
            log.warning(
                "mta_sts.fetch_failed",
                domain=domain,
                id=record.id,
                error=str(exc),
                kept=cached.id if cached is not None else "none",
            )
            if cached is not None:
                return StsState(cached, f"cached (refetch failed: {exc})", record.id)
            return StsState(None, f"policy fetch failed: {exc}", record.id)
        self._retry_after.pop(domain, None)
        entry = CachedPolicy(domain, record.id, policy, text, now)
        if store:
            await self._cache.put(entry)
        log.event(
            "mta_sts.policy_fetched",
            domain=domain,
            id=record.id,
            mode=policy.mode,
            max_age=policy.max_age,
        )
        return StsState(entry, "fetched", record.id)
