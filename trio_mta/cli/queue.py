"""``trio-mta queue ...``: read and edit the SQLite queue directly.

WAL mode lets these run safely beside a live server; ``flush`` only moves
``next_attempt``, which the running scheduler sees on its next poll. Where
there is no queue database yet (the server never ran with this state_dir),
every command says so, naming the path, and exits 1: a wrong ``--config`` must
not pass for an empty queue.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys

from trio_mta.cli.exits import EXIT_FAILURE
from trio_mta.config import Config
from trio_mta.queue.report import format_list, format_show
from trio_mta.queue.store import QueueError, QueueStore


def run_queue_command(config: Config, args: argparse.Namespace) -> int:
    action: str = args.queue_command
    path = config.queue_path
    if not path.exists():
        print(f"trio-mta queue: no queue at {path} (has the server run with this state_dir?)",
              file=sys.stderr)
        return EXIT_FAILURE
    try:
        store = QueueStore(path, readonly=action in ("list", "show"))
    except (QueueError, sqlite3.Error, OSError) as exc:
        print(f"trio-mta queue: cannot open {path}: {exc}", file=sys.stderr)
        return 1
    try:
        return _run(store, action, args)
    finally:
        store.close()


def _run(store: QueueStore, action: str, args: argparse.Namespace) -> int:
    if action == "list":
        print(format_list(store.list_messages(), json_output=args.json))
        return 0
    if action == "show":
        info = store.show(args.id)
        if info is None:
            print(f"trio-mta queue: no message {args.id}", file=sys.stderr)
            return 1
        print(format_show(info))
        return 0
    if action == "flush":
        count = store.flush(args.id)
        if args.id and count == 0:
            print(f"trio-mta queue: no queued recipients for {args.id}", file=sys.stderr)
            return 1
        print(f"{count} recipient(s) due now")
        return 0
    if action == "delete":
        if not store.delete(args.id):
            print(f"trio-mta queue: no message {args.id}", file=sys.stderr)
            return 1
        print(f"{args.id} deleted")
        return 0
    raise AssertionError(action)
