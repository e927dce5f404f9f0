"""Outbound TLS that cannot be downgraded: MTA-STS (RFC 8461) and DANE (RFC 7672).

- :mod:`~trio_mta.tlspolicy.sts` and :mod:`~trio_mta.tlspolicy.dane`: the
  sans-IO halves (TXT record, policy file, MX patterns; TLSA usability and
  certificate matching), fed plain text and bytes by the tests.
- :mod:`~trio_mta.tlspolicy.fetch`: the HTTPS policy fetch (h11 over trio).
- :mod:`~trio_mta.tlspolicy.cache`: the durable policy cache under ``state_dir``
  and the refetch rules.
- :mod:`~trio_mta.tlspolicy.plan`: what applies to one destination and each of
  its MX hosts, as data that remote delivery and ``trio-mta tls-policy`` share.

This ``__init__`` imports nothing, so :mod:`trio_mta.dns` can use the TLSA type
without pulling in the fetch machinery.
"""
