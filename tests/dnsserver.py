"""The loopback DNS server of the tests: now public as :mod:`trio_mta.testing.fake_dns`."""

from trio_mta.testing.fake_dns import MAX_CNAME_CHAIN, TTL, FakeDNS

DnsServer = FakeDNS

__all__ = ["MAX_CNAME_CHAIN", "TTL", "DnsServer", "FakeDNS"]
