"""``trio-mta queue ...``: read and edit the SQLite queue directly, every shard of it.

WAL mode lets these run safely beside a live server; ``flush`` only moves
``next_attempt``, which the running scheduler sees on its next poll. Under
``[server] workers`` each worker has its own shard (:mod:`trio_mta.queue.shards`):
``list`` merges them, the others act on whichever shard holds the ID. Where
there is no queue database yet (the server never ran with this state_dir),
every command says so, naming the path, and exits 1: a wrong ``--config`` must
not pass for an empty queue.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trio_mta.cli.exits import EXIT_FAILURE
from trio_mta.config import Config
from trio_mta.queue.report import format_list, format_show
from trio_mta.queue.shards import existing_shards
from trio_mta.queue.store import QueueError, QueueStore


class _CannotOpen(Exception):
    pass


def run_queue_command(config: Config, args: argparse.Namespace) -> int:
    action: str = args.queue_command
    paths = [path for _, path in existing_shards(config.state_dir)]
    if not paths:
        print(
            f"trio-mta queue: no queue at {config.queue_path} "
            "(has the server run with this state_dir?)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    try:
        with _open_all(paths, readonly=action in ("list", "show")) as stores:
            return _run(stores, action, args)
    except _CannotOpen as exc:
        print(f"trio-mta queue: {exc}", file=sys.stderr)
        return 1
    except QueueError as exc:  # a damaged database: one line, never a traceback
        print(
            f"trio-mta queue: {exc} (a server start recovers a damaged database)", file=sys.stderr
        )
        return 1


@contextmanager
def _open_all(paths: list[Path], *, readonly: bool) -> Iterator[list[QueueStore]]:
    stores: list[QueueStore] = []
    try:
        for path in paths:
            try:
                stores.append(QueueStore(path, readonly=readonly))
            except QueueError as exc:  # names the file and what to do
                raise _CannotOpen(str(exc)) from None
            except (sqlite3.Error, OSError) as exc:
                raise _CannotOpen(f"cannot open {path}: {exc}") from None
        yield stores
    finally:
        for store in stores:
            store.close()


def _run(stores: list[QueueStore], action: str, args: argparse.Namespace) -> int:
    if action == "list":
        rows = [row for store in stores for row in store.list_messages()]
        rows.sort(key=lambda row: (row.received_at, row.id))
        print(format_list(rows, json_output=args.json))
        return 0
    if action == "show":
        for store in stores:
            info = store.show(args.id)
            if info is not None:
                print(format_show(info))
                return 0
        print(f"trio-mta queue: no message {args.id}", file=sys.stderr)
        return 1
    if action == "flush":
        count = sum(store.flush(args.id) for store in stores)
        if args.id and count == 0:
            print(f"trio-mta queue: no queued recipients for {args.id}", file=sys.stderr)
            return 1
        print(f"{count} recipient(s) due now")
        return 0
    if action == "delete":
        if not any([store.delete(args.id) for store in stores]):
            print(f"trio-mta queue: no message {args.id}", file=sys.stderr)
            return 1
        print(f"{args.id} deleted")
        return 0
    raise AssertionError(action)
