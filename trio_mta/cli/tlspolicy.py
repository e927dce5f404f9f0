"""``trio-mta tls-policy DOMAIN``: what outbound TLS policy applies to a destination now.

For an administrator wondering why mail to a domain is deferred: the MX hosts
(and whether DNSSEC authenticated them), the TLSA records found for each and
whether they count, the MTA-STS policy with its id and age, and per host the
policy delivery would apply (SPEC §10). It asks the same DNS servers and reads
the same policy cache as the server, and never writes that cache: a policy it
has to fetch is shown, not stored.
"""

from __future__ import annotations

import logging
import time

import trio

from trio_mta.cli.exits import EXIT_FAILURE, EXIT_OK
from trio_mta.config import Config
from trio_mta.config.durations import format_duration
from trio_mta.dns import DnsError, MailHost, Resolver
from trio_mta.tlspolicy.cache import StsState
from trio_mta.tlspolicy.dane import unusable_reason
from trio_mta.tlspolicy.plan import HostPlan, TlsPlanner

__all__ = ["run_tls_policy"]


def run_tls_policy(config: Config, domain: str) -> int:
    # Policy warnings (a testing-mode failure, a failed fetch) are in the report itself.
    logging.getLogger("trio_mta").setLevel(logging.CRITICAL)
    lines: list[str] = []
    status = trio.run(_report, config, domain.strip().lower().rstrip("."), lines)
    print("\n".join(lines))
    return status


async def _report(config: Config, domain: str, out: list[str]) -> int:
    relay = config.relay
    resolver = Resolver(config.dns.nameservers, config.dns.timeout, prefer_ipv4=relay.prefer_ipv4)
    servers = ", ".join(f"{h}:{p}" for h, p in config.dns.nameservers) or "system resolver"
    out.append(f"destination: {domain}")
    out.append(f"DNS: {servers}; AD bit trusted: {_yes(resolver.trusts_ad)}")
    out.append(
        f"[relay] tls = {relay.tls}, mta_sts = {_on(relay.mta_sts)}, "
        f"dane = {_on(relay.dane)}, port {relay.port}"
    )
    if relay.smarthost:
        out.append(
            f"all mail goes to the smarthost {relay.smarthost}: MTA-STS and DANE do not apply"
        )
        return EXIT_OK
    try:
        hosts = await resolver.mail_hosts(domain)
    except DnsError as exc:
        out.append(f"MX: {exc}")
        return EXIT_FAILURE
    planner = TlsPlanner(relay, resolver, state_dir=config.state_dir)
    sts = await planner.destination(domain, store=False)
    out.extend(_sts_lines(sts, relay.mta_sts))
    for host in hosts:
        plan = await planner.host(domain, host, sts)
        out.extend(_host_lines(host, plan))
    return EXIT_OK


def _sts_lines(sts: StsState | None, enabled: bool) -> list[str]:
    if not enabled:
        return ["MTA-STS: off ([relay] mta_sts = false)"]
    assert sts is not None
    txt = f"TXT id {sts.txt_id}" if sts.txt_id else "no usable TXT id"
    if sts.cached is None:
        return [f"MTA-STS: no policy ({sts.note}; {txt})"]
    cached, now = sts.cached, time.time()
    left = max(0.0, cached.policy.max_age - cached.age(now))
    return [
        f"MTA-STS: {cached.policy.describe()}",
        f"  policy id {cached.id}, fetched {format_duration(round(cached.age(now)))} ago, "
        f"expires in {format_duration(round(left))} ({sts.note}; {txt})",
    ]


def _host_lines(host: MailHost, plan: HostPlan) -> list[str]:
    addresses = ", ".join(host.addresses)
    lines = [
        f"MX {host.preference} {host.name} ({addresses}) authenticated: {_yes(host.authenticated)}"
    ]
    tlsa = plan.tlsa
    if tlsa is None:
        lines.append(
            "  TLSA: not looked up"
            + ("" if host.authenticated else " (MX or address not authenticated)")
        )
    elif not tlsa.records:
        lines.append(f"  TLSA {tlsa.name}: none")
    else:
        lines.append(
            f"  TLSA {tlsa.name}: {len(tlsa.records)} record(s), "
            f"authenticated: {_yes(tlsa.authenticated)}"
        )
        for record in tlsa.records:
            why = unusable_reason(record)
            lines.append(f"    {record}  {'usable' if why is None else 'unusable: ' + why}")
    lines.append(f"  tls_policy={plan.policy}: {_explain(plan)}")
    return lines


def _explain(plan: HostPlan) -> str:
    if plan.refusal is not None:
        return f"host NOT used: {plan.explain(plan.refusal)}"
    if plan.policy == "dane":
        if plan.check is None:
            return "STARTTLS required (secure TLSA records, none usable); certificate not checked"
        return "STARTTLS required; the certificate must match a usable TLSA record"
    if plan.policy == "mta-sts":
        return f"STARTTLS required; the certificate must verify for {plan.host.name}"
    note = " (MTA-STS testing: failures are logged)" if plan.sts_testing else ""
    return {
        "verify": "STARTTLS required; the certificate must verify for the MX name",
        "required": "STARTTLS required; the certificate is not checked",
        "opportunistic": "STARTTLS when offered, else plain text",
        "none": "plain text",
    }.get(plan.policy, plan.policy) + note


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _on(flag: bool) -> str:
    return "true" if flag else "false"
