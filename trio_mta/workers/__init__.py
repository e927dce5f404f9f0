"""``[server] workers``: several processes, each a complete trio MTA (SPEC §12, DESIGN.md).

The parent (:mod:`~trio_mta.workers.supervisor`) binds every listener, starts
the workers as fresh interpreters (``python -m trio_mta _worker``, never a fork
of a running trio process), restarts those that die and forwards signals.
Each worker (:mod:`~trio_mta.workers.worker`) runs ``serve()`` over the sockets
it was handed, with its own group-commit writer and its own queue shard
(:mod:`trio_mta.queue.shards`): shared-nothing, so "250 only once durable"
is argued per process exactly as for one. Metrics are summed by the parent
(:mod:`~trio_mta.workers.metrics`).
"""
