"""The full MTA (durable queue, Maildir delivery) inside a trio application.

``serve`` is an ordinary trio task: it shares the nursery with whatever else
the application runs, here a task that reports the queue every few seconds.
Cancelling the nursery stops everything; ``MTA.stop()`` stops the MTA
gracefully first.

    python examples/embed_full_mta.py                      # in-code config: localhost on :2525
    python examples/embed_full_mta.py --config examples/mta.toml --listen 127.0.0.1:2525
    swaks --server 127.0.0.1:2525 --to someone@localhost    # lands in ./embed-data/mail/someone/

Runs until Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import trio

import trio_mta
from trio_mta.tls import TLSConfigError


def in_code_config(state_dir: Path) -> trio_mta.Config:
    """What a small application might build itself: one smtp listener, mail for
    @localhost into ``<state_dir>/mail/<local part>/``, loopback may relay."""
    return trio_mta.Config.from_mapping(
        {
            "hostname": "localhost",
            "state_dir": str(state_dir),
            "listen": [{"address": "127.0.0.1:2525", "mode": "smtp"}],
            "local": {"domains": ["localhost"]},
            "queue": {"retry_initial": "30s", "retry_max": "10m"},
        },
        base_dir=Path.cwd(),
    )


async def report_queue(mta: trio_mta.MTA, interval: float, out: TextIO) -> None:
    """The application's own task, beside the MTA: print the queue every ``interval`` s."""
    assert mta.store is not None  # serve() ran with its queue (the default)
    while True:
        # The store is SQLite: read it in a worker thread, never on the event loop.
        queued = await trio.to_thread.run_sync(mta.store.list_messages)
        waiting = sum(len(m.recipients) for m in queued)
        delivered = mta.delivered
        print(
            f"queue: {len(queued)} message(s), {waiting} recipient(s) waiting; "
            f"{delivered} delivered since start",
            file=out,
            flush=True,
        )
        await trio.sleep(interval)


async def run(config: trio_mta.Config, interval: float, out: TextIO) -> None:
    """Serve with the queue reporter beside it until SIGINT/SIGTERM (a second one: at once)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def run_mta(task_status: trio.TaskStatus[trio_mta.MTA]) -> None:
                await trio_mta.serve(config, task_status=task_status)
                nursery.cancel_scope.cancel()  # the MTA stopped: so does the application

            mta: trio_mta.MTA = await nursery.start(run_mta)  # returns once listening
            for listener in mta.listeners:
                print(
                    f"listening on {listener.host}:{listener.port} ({listener.mode})",
                    file=out,
                    flush=True,
                )
            print(
                f"mail for {', '.join(config.local.domains)} goes to {config.local.maildir_root}",
                file=out,
                flush=True,
            )
            nursery.start_soon(report_queue, mta, interval, out)
            stopping = False
            async for _ in signals:
                if stopping:
                    nursery.cancel_scope.cancel()
                    return
                print("stopping", file=out, flush=True)
                stopping = True
                mta.stop()


def load(args: argparse.Namespace) -> trio_mta.Config:
    if args.config is None:
        config = in_code_config(args.state_dir or Path("embed-data"))
        state_dir = None
    else:
        config = trio_mta.Config.load(args.config)
        state_dir = args.state_dir
    # The same overrides as `trio-mta serve --listen/--state-dir`.
    return config.with_overrides(listen=[args.listen] if args.listen else None, state_dir=state_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="a trio-mta TOML file (default: in-code)")
    parser.add_argument(
        "--listen",
        metavar="ADDR:PORT[/MODE]",
        help="listen here instead (default 127.0.0.1:2525; port 0: any free)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="queue and Maildir root (default ./embed-data for the in-code config)",
    )
    parser.add_argument(
        "--interval", type=float, default=10.0, help="seconds between queue reports"
    )
    args = parser.parse_args(argv)
    try:
        config = load(args)
    except trio_mta.ConfigError as exc:
        for line in exc.errors:
            print(f"embed_full_mta: config: {line}", file=sys.stderr)
        return 2
    try:
        trio.run(run, config, args.interval, sys.stdout)
    except Exception as exc:
        cause = sole_exception(exc)
        if isinstance(cause, TLSConfigError):
            print(f"embed_full_mta: config: {cause}", file=sys.stderr)
            return 2
        if isinstance(cause, trio_mta.ListenError | OSError):
            print(f"embed_full_mta: {cause}", file=sys.stderr)
            return 1
        raise
    return 0


def sole_exception(exc: BaseException) -> BaseException:
    """Nurseries wrap errors in exception groups; a single cause is reported as itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
