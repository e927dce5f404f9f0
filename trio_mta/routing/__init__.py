"""Routing: where each recipient goes, and whether this client may send there.

Owns the router (:mod:`~trio_mta.routing.router`: local vs remote, relay
policy, postmaster) and the pure mail-map rules it shares with the config
loader (:mod:`~trio_mta.routing.mailmap`: address keys, the one mailbox-name
rule, alias expansion). Must not do I/O beyond reading its maps: the session
calls it inline for every RCPT.
"""
