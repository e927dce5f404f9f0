"""Remote delivery: route, connect, one SMTP transaction per message and domain (SPEC §5).

Routing is by MX (RFC 5321 §5.1, through :class:`~trio_mta.dns.Resolver`), by
an address literal (``user@[192.0.2.1]`` goes straight there), or, with
``[relay] smarthost`` set, everything to the smarthost. Every host and each of
its addresses is tried in order until one answers; from then on that host's
replies decide: 2xx delivered, 4xx deferred, 5xx failed, each outcome carrying
the reply's code, status and text, the host and the stage. Connection-level
trouble (refused, timeout, 4xx greeting, TLS required but unavailable) moves on
to the next address, a 5xx greeting to the next host; when nothing answers,
every recipient is deferred with each address's own cause, bounded in length.

A batch is one message for one destination (the scheduler groups and limits;
see :mod:`trio_mta.queue.scheduler`); each batch is one transaction. Lines
longer than SMTP allows are made to fit on the way out
(:mod:`trio_mta.delivery.longlines`). Connections are kept open for a few
seconds after a transaction: the next message to the same address (port and
TLS policy) reuses it. A pooled connection is only ever in one task's hands.
:meth:`RemoteAgent.run` closes idle connections; run it in the same nursery as
the scheduler.

TLS per host follows :mod:`trio_mta.tlspolicy.plan` (SPEC §10): DANE, then
MTA-STS, then ``[relay] tls``. A host a policy rules out is never connected to;
a failure a policy caused says so in its text (``dane: ...``, ``mta-sts
enforce: ...``), which is what ``queue show`` prints. Every attempt's log line
carries ``tls_policy=`` and is counted per policy and outcome.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import trio

from trio_mta import log
from trio_mta.client import (
    SMTPClient,
    SMTPClientError,
    SMTPResponseError,
    SMTPTLSError,
    Timeouts,
    TLSMode,
    TransactionResult,
)
from trio_mta.config import RelayConfig
from trio_mta.delivery.agent import DeliveryItem
from trio_mta.delivery.longlines import fit_lines
from trio_mta.delivery.outcome import Kind, Outcome, Stage
from trio_mta.dns import DnsError, MailHost, Resolver
from trio_mta.metrics import Metrics
from trio_mta.smtp.address import parse_path
from trio_mta.smtp.client import DsnRequest
from trio_mta.smtp.commands import RcptParams
from trio_mta.smtp.errors import CommandError
from trio_mta.smtp.replies import Reply
from trio_mta.tls import client_context
from trio_mta.tlspolicy.cache import StsState
from trio_mta.tlspolicy.plan import STATUS, HostPlan, PolicyName, TlsPlanner, testing_failure

__all__ = ["RemoteAgent"]

_CLOSE_TIMEOUT: Final = 2.0  # shutting down: QUIT to idle connections, then drop them
_CAUSE_MAX: Final = 200  # characters of one address's cause in a deferral's text
_CAUSES_MAX: Final = 800  # characters of all of them together

# (address, port, TLS mode, verified host name or ""). The name is part of the key
# in verify mode: a connection authenticated for one MX name is not reused for
# another name that happens to share the address.
_PoolKey = tuple[str, int, str, str]


@dataclass(frozen=True)
class _Route:
    hosts: tuple[MailHost, ...]
    port: int
    mode: TLSMode
    context: ssl.SSLContext | None
    credentials: tuple[str, str] | None
    domain: str = ""
    policies: bool = False  # MX routing: DANE and MTA-STS apply
    sts: StsState | None = None
    policy: PolicyName = "opportunistic"  # when policies is False


class _Undeliverable(Exception):
    """No route: every recipient of the group gets this outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


@dataclass
class _Pool:
    """Idle connections by key, most recently used last."""

    idle: dict[_PoolKey, list[tuple[float, SMTPClient]]] = field(default_factory=dict)

    def put(self, key: _PoolKey, client: SMTPClient, now: float) -> None:
        self.idle.setdefault(key, []).append((now, client))

    def take(self, key: _PoolKey, fresh_after: float) -> tuple[SMTPClient | None, list[SMTPClient]]:
        """(newest idle connection or None, stale ones removed on the way)."""
        entries = self.idle.get(key)
        if not entries:
            return None, []
        stale = [client for since, client in entries if since < fresh_after]
        entries[:] = [(since, client) for since, client in entries if since >= fresh_after]
        client = entries.pop()[1] if entries else None
        if not entries:
            del self.idle[key]
        return client, stale

    def expire(self, fresh_after: float) -> list[SMTPClient]:
        stale: list[SMTPClient] = []
        for key in list(self.idle):
            entries = self.idle[key]
            stale.extend(client for since, client in entries if since < fresh_after)
            entries[:] = [(since, client) for since, client in entries if since >= fresh_after]
            if not entries:
                del self.idle[key]
        return stale

    def drain(self) -> list[SMTPClient]:
        clients = [client for entries in self.idle.values() for _, client in entries]
        self.idle.clear()
        return clients


class RemoteAgent:
    """The :class:`~trio_mta.delivery.agent.DeliveryAgent` for non-local recipients.

    ``idle_timeout`` 0 turns connection reuse off.
    """

    def __init__(
        self,
        relay: RelayConfig,
        resolver: Resolver,
        *,
        hostname: str,
        timeouts: Timeouts | None = None,
        idle_timeout: float = 5.0,
        state_dir: Path | None = None,
        metrics: Metrics | None = None,
        policy_fetch_timeout: float = 30.0,
    ) -> None:
        """*state_dir* holds the MTA-STS policy cache (None: memory only)."""
        if idle_timeout < 0:
            raise ValueError("idle_timeout must not be negative")
        self._relay = relay
        self._resolver = resolver
        self._hostname = hostname.lower().rstrip(".")
        self._timeouts = timeouts or Timeouts()
        self._idle_timeout = idle_timeout
        self._pool = _Pool()
        self._metrics = metrics
        self._planner = TlsPlanner(
            relay, resolver, state_dir=state_dir, fetch_timeout=policy_fetch_timeout
        )
        # Contexts are built once: loading a CA bundle per connection is costly.
        self._mx_context = (
            None if relay.tls == "none" else client_context(relay.tls, ca_file=relay.ca_file)
        )
        # The smarthost is authenticated exactly when MX hosts are ("verify");
        # "starttls" means STARTTLS or nothing.
        verify = relay.tls == "verify"
        self._smarthost_mode: TLSMode = {
            "starttls": "verify" if verify else "required",
            "implicit": "implicit",
            "none": "none",
        }[relay.smarthost_tls]
        self._smarthost_context: ssl.SSLContext | None = None
        if relay.smarthost and relay.smarthost_tls != "none":
            checked: Literal["verify", "required"] = "verify" if verify else "required"
            self._smarthost_context = client_context(checked, ca_file=relay.ca_file)

    # --- the DeliveryAgent protocol ---------------------------------------------

    async def deliver(self, items: Sequence[DeliveryItem]) -> Sequence[Outcome]:
        """One transaction for the batch: one message to one destination.

        Raises ValueError for a batch that mixes messages, or domains when
        routing by MX: grouping is the scheduler's job, and guessing here
        would hide its mistake.
        """
        if not items:
            return []
        first = items[0].rcpt
        domain = _domain(first.address)
        for item in items:
            if item.rcpt.message_id != first.message_id or (
                not self._relay.smarthost and _domain(item.rcpt.address) != domain
            ):
                raise ValueError("a remote batch must be one message to one destination")
        return await self._deliver_group(domain, list(items))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close connections idle longer than ``idle_timeout`` until cancelled, then all."""
        task_status.started()
        try:
            if self._idle_timeout <= 0:
                await trio.sleep_forever()
            while True:
                await trio.sleep(self._idle_timeout / 2)
                await _quit_all(self._pool.expire(trio.current_time() - self._idle_timeout))
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """QUIT every idle connection (bounded: shutdown never waits on a slow peer)."""
        with trio.move_on_after(_CLOSE_TIMEOUT):
            await _quit_all(self._pool.drain())
        for client in self._pool.drain():
            await client.aclose()

    # --- one group: one message, one domain ----------------------------------------

    async def _deliver_group(self, domain: str, items: list[DeliveryItem]) -> list[Outcome]:
        first = items[0].rcpt
        if not _valid_path(first.sender, null_ok=True):
            outcome = _ours("failed", "5.1.7", f"invalid sender address <{first.sender}>")
            return [outcome] * len(items)
        outcomes: list[Outcome | None] = [
            None
            if _valid_path(item.rcpt.address, null_ok=False)
            else _ours("failed", "5.1.3", f"invalid recipient address <{item.rcpt.address}>")
            for item in items
        ]
        todo = [i for i, outcome in enumerate(outcomes) if outcome is None]
        if todo:
            try:
                route = await self._route(domain)
            except _Undeliverable as exc:
                results = [exc.outcome] * len(todo)
            else:
                results = await self._transact(
                    route, first.message_id, first.sender, [items[i] for i in todo]
                )
            for i, outcome in zip(todo, results, strict=True):
                outcomes[i] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    async def _route(self, domain: str) -> _Route:
        relay = self._relay
        smarthost = relay.smarthost_address
        if smarthost is not None:
            host, port = smarthost
            try:
                found = await self._host_addresses(host)
            except DnsError as exc:
                # The smarthost is our own configuration, not the recipient's
                # domain: even NXDOMAIN is a reason to wait, never to bounce.
                text = f"smarthost {host}: {exc}"
                raise _Undeliverable(_ours("deferred", "4.4.3", text, "dns")) from None
            shown: PolicyName = (
                "none"
                if self._smarthost_mode == "none"
                else "verify"
                if relay.tls == "verify"
                else "required"
            )
            return _Route(
                (found,),
                port,
                self._smarthost_mode,
                self._smarthost_context,
                relay.smarthost_credentials,
                policy=shown,
            )
        literal = _address_literal(domain)
        if literal is not None:
            hosts: tuple[MailHost, ...] = (MailHost(domain, 0, (literal,)),)
            return _Route(hosts, relay.port, relay.tls, self._mx_context, None, policy=relay.tls)
        try:
            hosts = self._without_self(domain, await self._resolver.mail_hosts(domain))
        except DnsError as exc:
            kind: Kind = "failed" if exc.permanent else "deferred"
            raise _Undeliverable(_ours(kind, exc.status, str(exc), "dns")) from None
        sts = await self._planner.destination(domain)
        return _Route(
            hosts,
            relay.port,
            relay.tls,
            self._mx_context,
            None,
            domain=domain,
            policies=True,
            sts=sts,
        )

    async def _plan(self, route: _Route, host: MailHost) -> HostPlan:
        if route.policies:
            return await self._planner.host(route.domain, host, route.sts)
        return HostPlan(host, route.policy, route.mode, route.context)

    async def _host_addresses(self, host: str) -> MailHost:
        try:
            return MailHost(host, 0, (str(ipaddress.ip_address(host)),))
        except ValueError:
            return MailHost(host, 0, await self._resolver.addresses(host))

    def _without_self(self, domain: str, hosts: list[MailHost]) -> tuple[MailHost, ...]:
        """RFC 5321 §5.1: drop our own entry and every host ranked at or below it."""
        ours = [h.preference for h in hosts if h.name.lower().rstrip(".") == self._hostname]
        if not ours:
            return tuple(hosts)
        kept = tuple(h for h in hosts if h.preference < min(ours))
        if not kept:
            text = f"mail for {domain} loops back to myself ({self._hostname} is its best MX)"
            raise _Undeliverable(_ours("failed", "5.4.6", text, "route"))
        return kept

    async def _transact(
        self, route: _Route, queue_id: str, sender: str, items: list[DeliveryItem]
    ) -> list[Outcome]:
        """Try the route's hosts and addresses in order; the first that answers decides."""
        recipients = [item.rcpt.address for item in items]
        # A body file is read in a thread: no disk I/O in the event loop.
        data = fit_lines(await trio.to_thread.run_sync(lambda: items[0].data))
        failures: list[Outcome] = []
        for host in route.hosts:
            plan = await self._plan(route, host)
            if plan.refusal is not None:
                # The policy rules this host out: no connection, nothing sent (SPEC §10).
                failure = Outcome(
                    "deferred", STATUS, plan.explain(plan.refusal), None, host.name, None, "tls"
                )
                failures.append(failure)
                self._attempt_failed(queue_id, plan, None, failure.detail, "refused")
                continue
            for address in host.addresses:
                try:
                    client, result = await self._send(
                        route, plan, address, sender, recipients, data, _dsn_request(items)
                    )
                except SMTPClientError as exc:
                    failure = _failure(exc, host.name, address, route.port)
                    if failure.stage == "tls":
                        failure = dataclasses.replace(failure, text=plan.explain(failure.text))
                    failures.append(failure)
                    self._attempt_failed(queue_id, plan, address, failure.detail, "unreachable")
                    if _permanent_greeting(exc):
                        break  # a 5xx greeting speaks for the whole host
                    continue
                if plan.sts_testing and client.tls is None:
                    testing_failure(route.domain, host.name, "the session was not encrypted")
                outcomes = [
                    _outcome(reply, host.name, client.address, stage, client.dsn)
                    for reply, stage in zip(result.outcomes, _stages(result), strict=True)
                ]
                summary = _summary(outcomes)
                log.event(
                    "delivery.attempt",
                    id=queue_id,
                    host=host.name,
                    address=address,
                    tls=client.tls or "none",
                    tls_policy=plan.policy,
                    mta_sts="testing" if plan.sts_testing else None,
                    reply=str(_deciding(result)),
                    outcome=summary,
                )
                self._count(plan.policy, summary)
                await self._checkin(self._key(route, plan, address), client)
                return outcomes
        return [_unreachable(failures, route.port)] * len(items)

    def _attempt_failed(
        self, queue_id: str, plan: HostPlan, address: str | None, detail: str, outcome: str
    ) -> None:
        """Log a host or address that did not get as far as a transaction."""
        log.event(
            "delivery.attempt",
            id=queue_id,
            host=plan.host.name,
            address=address,
            tls_policy=plan.policy,
            mta_sts="testing" if plan.sts_testing else None,
            reply=detail,
            outcome=outcome,
        )
        self._count(plan.policy, outcome)

    def _count(self, policy: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.tls_policy_attempt(policy, outcome)

    def _key(self, route: _Route, plan: HostPlan, address: str) -> _PoolKey:
        # A connection is reused only under the same policy; one authenticated for
        # one MX name (verify, MTA-STS, DANE) never serves another name.
        named = plan.mode == "verify" or plan.policy == "dane" or plan.check is not None
        return (address, route.port, f"{plan.policy}/{plan.mode}", plan.host.name if named else "")

    async def _checkout(
        self, route: _Route, plan: HostPlan, address: str
    ) -> tuple[SMTPClient, bool]:
        """A pooled connection (True: reused) or a new one (False).

        A pooled connection is used without an RSET probe: a completed
        transaction leaves the session ready for MAIL (RFC 5321 §4.1.4), and the
        client machine itself sends RSET after one that was left open. A peer
        that hung up while the connection was idle is caught by ``_send``.
        """
        key = self._key(route, plan, address)
        client, stale = self._pool.take(key, trio.current_time() - self._idle_timeout)
        for old in stale:
            await old.aclose()
        if client is not None and client.usable:
            return client, True
        if client is not None:
            await client.aclose()
        return await self._connect(route, plan, address), False

    async def _connect(self, route: _Route, plan: HostPlan, address: str) -> SMTPClient:
        client = await SMTPClient.connect(
            address,
            route.port,
            helo_name=self._hostname,
            tls=plan.mode,
            ssl_context=plan.context,
            server_hostname=plan.host.name,
            timeouts=self._timeouts,
            tls_check=plan.check,
        )
        if route.credentials is not None:
            try:
                await client.login(*route.credentials)
            except BaseException:
                await client.aclose()
                raise
        return client

    async def _send(
        self,
        route: _Route,
        plan: HostPlan,
        address: str,
        sender: str,
        recipients: list[str],
        data: bytes,
        dsn: DsnRequest | None = None,
    ) -> tuple[SMTPClient, TransactionResult]:
        """One transaction at ``address``; a reused connection found dead is replaced once.

        Only a failure with no reply at all is retried: the server then never
        accepted anything on that connection (it had closed it while idle).
        """
        client, reused = await self._checkout(route, plan, address)
        for retry in (False, True):
            try:
                result = await client.send(sender, recipients, data, dsn=dsn)
            except SMTPClientError as exc:
                await client.aclose()
                if retry or not reused or exc.reply is not None:
                    raise
            except BaseException:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                raise
            else:
                # A 421 to MAIL on a reused connection is the server's idle-timeout
                # goodbye, written before our MAIL arrived (RFC 5321 §3.8).
                if retry or not reused or result.mail_reply.code != 421:
                    return client, result
                await client.aclose()
            client = await self._connect(route, plan, address)
        raise AssertionError("unreachable")

    async def _checkin(self, key: _PoolKey, client: SMTPClient) -> None:
        """Pool a reusable connection; close the rest without letting a cancel interrupt."""
        if client.usable and self._idle_timeout > 0:
            self._pool.put(key, client, trio.current_time())
            return
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            await client.quit()


# --- helpers ------------------------------------------------------------------------


async def _quit_all(clients: list[SMTPClient]) -> None:
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.quit)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _address_literal(domain: str) -> str | None:
    """The address in ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3), else None.

    The inbound parser only accepts valid literals; a general (tagged)
    literal has no defined transport, so it fails the recipient.
    """
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        text = f"unsupported address literal {domain}"
        raise _Undeliverable(_ours("failed", "5.1.2", text, "route")) from None


def _valid_path(address: str, *, null_ok: bool) -> bool:
    try:
        parse_path(f"<{address}>", smtputf8=True, allow_null=null_ok)
    except CommandError:
        return False
    return True


def _dsn_request(items: list[DeliveryItem]) -> DsnRequest | None:
    """The RFC 3461 parameters the client gave, for a next hop that takes them."""
    first = items[0].rcpt
    params = tuple(RcptParams(notify=i.rcpt.notify, orcpt=i.rcpt.orcpt) for i in items)
    if first.ret is None and first.envid is None and params == (RcptParams(),) * len(params):
        return None
    return DsnRequest(params, ret=first.ret, envid=first.envid)


def _ours(kind: Kind, status: str, text: str, stage: Stage = "route") -> Outcome:
    """An outcome we decided ourselves, without a server's reply."""
    return Outcome(kind, status, text, stage=stage)


def _kind(code: int) -> Kind:
    if 200 <= code < 300:
        return "delivered"
    return "failed" if code >= 500 else "deferred"  # 4xx, and 3xx where a final reply belonged


def _outcome(
    reply: Reply, host: str, address: str, stage: Stage | None, dsn_passed: bool = False
) -> Outcome:
    kind = _kind(reply.code)
    default = {"delivered": "2.0.0", "deferred": "4.0.0", "failed": "5.0.0"}[kind]
    # A 3xx where a final reply belonged carries no usable status of its own.
    status = reply.status if reply.status and reply.status[0] == default[0] else default
    return Outcome(
        kind,
        status,
        reply.text,
        reply.code,
        host,
        address,
        stage,
        dsn_passed=dsn_passed and kind == "delivered",
    )


def _stages(result: TransactionResult) -> list[Stage]:
    """Per recipient, the transaction step whose reply decided it."""
    out: list[Stage] = []
    for rcpt in result.rcpt_replies:
        if not result.mail_reply.is_success or rcpt is None:
            out.append("mail")
        elif not rcpt.is_success or result.data_reply is None:
            out.append("rcpt")
        else:
            out.append("data")
    return out


_SESSION_STAGES: Final[dict[str, Stage]] = {
    "greeting": "greeting",
    "EHLO": "ehlo",
    "STARTTLS": "tls",
}


def _failure(exc: SMTPClientError, host: str, address: str, port: int) -> Outcome:
    """One address that gave no transaction: its own reason, as data.

    The server's own words when it said something (a 421 greeting, a refused
    AUTH); otherwise what went wrong locally, without the "connect to X port
    P" preamble the client puts in front (the outcome names the address).
    """
    if isinstance(exc, SMTPTLSError):
        stage: Stage = "tls"
    elif exc.stage is not None:
        stage = _SESSION_STAGES.get(exc.stage, "auth" if exc.stage.startswith("AUTH") else "ehlo")
    else:
        stage = "connect"
    # Whatever the reply said (even a 2xx before a failed handshake), this is a deferral.
    status = exc.status if exc.status[:1] in ("4", "5") else "4.0.0"
    if exc.reply is not None:
        return Outcome("deferred", status, exc.reply.text, exc.reply.code, host, address, stage)
    text = str(exc).removeprefix(f"connect to {address} port {port}: ")
    return Outcome("deferred", status, text, None, host, address, stage)


def _unreachable(failures: list[Outcome], port: int) -> Outcome:
    """The deferral when no address answered: each address's cause, bounded in length.

    With one address tried its outcome stands as it is (code, host, stage);
    with several, the text lists them in order, e.g.
    ``mx1.example [192.0.2.1]:25: Connection refused; mx2.example [192.0.2.2]:25:
    421 4.3.2 shutting down``, and the status is the last one's.
    """
    if not failures:
        return _ours("deferred", "4.4.1", "no address to connect to", "connect")
    if len(failures) == 1:
        return failures[0]
    causes = [
        _clip(f"{_where(f, port)}: {f.reply if f.code else f.text}", _CAUSE_MAX) for f in failures
    ]
    text = "; ".join(causes)
    if len(text) > _CAUSES_MAX:
        kept: list[str] = []
        for cause in causes:
            if len("; ".join([*kept, cause])) > _CAUSES_MAX - 20:
                break
            kept.append(cause)
        text = "; ".join(kept) + f"; and {len(causes) - len(kept)} more"
    last = failures[-1]
    return Outcome("deferred", last.status, text, stage=last.stage)


def _where(failure: Outcome, port: int) -> str:
    """``mx1.example [192.0.2.1]:25``, or the host alone when a policy refused it unasked."""
    if failure.remote_address is None:
        return str(failure.remote_host)
    return f"{failure.remote_host} [{failure.remote_address}]:{port}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _permanent_greeting(exc: SMTPClientError) -> bool:
    return isinstance(exc, SMTPResponseError) and exc.stage == "greeting" and exc.reply.is_permanent


def _deciding(result: TransactionResult) -> Reply:
    """The reply that best sums up a transaction for the log line."""
    if result.data_reply is not None:
        return result.data_reply
    refusals = [r for r in result.outcomes if not r.is_success]
    return refusals[0] if refusals else result.mail_reply


def _summary(outcomes: Sequence[Outcome]) -> str:
    kinds = {o.kind for o in outcomes}
    return kinds.pop() if len(kinds) == 1 else "mixed"
