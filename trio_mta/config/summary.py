"""What ``check-config`` prints: the effective configuration, one ``name: value`` line each.

An operator reads this to confirm what the server will do before starting it, so every value
is the resolved one (absolute paths, defaults filled in, where the certificate comes from).
"""

from __future__ import annotations

from trio_mta.config.loader import Config
from trio_mta.config.schema import format_host_port

__all__ = ["describe"]


def _count(number: int, singular: str, plural: str) -> str:
    return f"{number} {singular if number == 1 else plural}"


def describe(config: Config) -> list[str]:
    """``hostname: mx.example.org``, ``listen: ...`` and so on, in the order of SPEC §3."""
    lines = [f"hostname: {config.hostname}"]
    lines += [f"listen: {line}" for line in config.describe_listeners()]
    local = config.local
    lines.append(f"local domains: {', '.join(local.domains)}")
    if local.mailboxes is None:
        lines.append("mailboxes: every local part is a mailbox (no map)")
    else:
        where = f" (file {local.mailboxes_file})" if local.mailboxes_file else ""
        mapped = _count(len(local.mailboxes), "address", "addresses")
        lines.append(f"mailboxes: {mapped} mapped{where}")
    lines.append(f"aliases: {_count(len(local.aliases), 'alias', 'aliases')}")
    lines.append(f"maildir root: {local.maildir_root}")
    lines.append(f"state dir: {config.state_dir} (queue {config.queue_path})")
    networks = ", ".join(str(net) for net in config.relay.trusted_networks) or "none"
    lines.append(f"trusted networks: {networks}")
    lines.append(f"tls: {_tls_source(config)}")
    lines.append(f"outbound: {_outbound(config)}")
    if config.dns.nameservers:
        servers = ", ".join(format_host_port(host, port) for host, port in config.dns.nameservers)
        lines.append(f"dns: nameservers {servers}")
    else:
        lines.append("dns: the system resolver (/etc/resolv.conf)")
    lines.append(f"users file: {config.auth.users_file}")
    # Keys were loaded with the config: each line names a key that can sign.
    lines += [f"dkim: signs {key.describe()}" for key in config.dkim.sign]
    lines.append(f"verify: {_verify(config)}")
    if config.user is not None:
        group = config.group or "its own group"
        lines.append(f"user: {config.user} ({group}), taken after binding when started as root")
    lines.append(f"metrics: {config.metrics.listen or 'off'}")
    lines.append(f"log: {config.log.level}, {config.log.format}, to {config.log.file or 'stderr'}")
    return lines


def _verify(config: Config) -> str:
    """Which SPEC §9 checks run on mail from untrusted, unauthenticated smtp clients."""
    v = config.verify
    checks = [name for name, on in (("spf", v.spf), ("dkim", v.dkim), ("dmarc", v.dmarc)) if on]
    enforced = [name for name, on in (("spf", v.spf_enforce), ("dmarc", v.dmarc_enforce)) if on]
    text = ", ".join(checks) or "off"
    return text + (f" (enforcing {', '.join(enforced)})" if enforced else " (not enforced)")


def _tls_source(config: Config) -> str:
    if config.tls.cert is not None and config.tls.key is not None:
        return f"certificate {config.tls.cert}, key {config.tls.key}"
    cert, _ = config.generated_cert_paths
    return f"self-signed for {config.hostname}, generated in {cert.parent}"


def _outbound(config: Config) -> str:
    relay = config.relay
    if relay.smarthost_address is not None:
        host, port = relay.smarthost_address
        auth = ", AUTH" if relay.smarthost_auth else ""
        return f"via smarthost {format_host_port(host, port)} ({relay.smarthost_tls}{auth})"
    return f"direct to each domain's MX, port {relay.port}, TLS {relay.tls}"
