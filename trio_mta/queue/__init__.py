"""The durable queue, and what it sends back.

Owns the SQLite store (:mod:`~trio_mta.queue.store`), the group-commit writer
(:mod:`~trio_mta.queue.writer`), the scheduler that hands due recipients to
delivery agents (:mod:`~trio_mta.queue.scheduler`), queue IDs, the operator
report, and delivery status notifications: the DSN builder
(:mod:`~trio_mta.queue.dsn`) and the bouncer that queues them
(:mod:`~trio_mta.queue.bouncer`). Must not know SMTP: agents report outcomes
as data.
"""
