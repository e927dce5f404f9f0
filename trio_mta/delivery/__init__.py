"""Delivery agents: where the scheduler's due recipients go.

Owns the agent interface (:mod:`~trio_mta.delivery.agent`), Maildir delivery
(:mod:`~trio_mta.delivery.maildir`) and remote SMTP delivery
(:mod:`~trio_mta.delivery.remote`: MX resolution, TLS policy, the
transaction). Each agent returns one outcome per item; it knows files or SMTP,
never how the queue stores things.
"""
