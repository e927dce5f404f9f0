"""The ``trio-mta`` command line (SPEC §2).

Exit codes: 0 ok, 2 bad configuration or usage (the message names the key
or flag), 1 any other failure. Errors are one line each, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trio_mta import __version__, log
from trio_mta.cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from trio_mta.config import Config, ConfigError

if TYPE_CHECKING:
    from trio_mta.mta import MTA
    from trio_mta.workers.worker import WorkerSpec

WORKER_COMMAND = "_worker"  # internal: a supervised worker, see trio_mta.workers


class UsageError(Exception):
    """Bad command-line usage; exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _add_config(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # --config may stand before or after the subcommand (SPEC §2); the
    # subparser copy must not clobber a value given before it.
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None if top else argparse.SUPPRESS,
        help="configuration file (default: $TRIO_MTA_CONFIG, else built-in defaults)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trio-mta", description="A mail transfer agent on trio.")
    parser.add_argument(
        "--version", action="store_true", help=f"print trio-mta {__version__} and exit"
    )
    _add_config(parser, top=True)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the MTA in the foreground (the default)")
    _add_serve_flags(serve)
    _add_config(serve, top=False)

    check = sub.add_parser("check-config", help="validate the configuration")
    _add_config(check, top=False)

    queue = sub.add_parser("queue", help="inspect and manage the queue")
    _add_config(queue, top=False)
    qsub = queue.add_subparsers(dest="queue_command", parser_class=_Parser, required=True)
    qlist = qsub.add_parser("list", help="what is queued")
    qlist.add_argument("--json", action="store_true", help="JSON array (SPEC §8)")
    _add_config(qlist, top=False)
    qshow = qsub.add_parser("show", help="one message in detail")
    qshow.add_argument("id")
    _add_config(qshow, top=False)
    qflush = qsub.add_parser("flush", help="make queued items due now")
    qflush.add_argument("id", nargs="?")
    _add_config(qflush, top=False)
    qdel = qsub.add_parser("delete", help="drop a queued message (no bounce)")
    qdel.add_argument("id")
    _add_config(qdel, top=False)

    passwd = sub.add_parser("passwd", help="set a submission password")
    passwd.add_argument("user")
    _add_config(passwd, top=False)

    from trio_mta.cli import dkim

    _add_config(dkim.add_parser(sub, _Parser), top=False)
    tlspolicy = sub.add_parser(
        "tls-policy", help="show the outbound TLS policy (MTA-STS, DANE) of a destination"
    )
    tlspolicy.add_argument("domain")
    _add_config(tlspolicy, top=False)

    # sendmail's flags (-oi, -fSENDER, -ti) are getopt-style, not argparse's: a
    # prefix no argument can start with hands every one of them to trio_mta.cli.sendmail.
    sendmail = sub.add_parser(
        "sendmail",
        prefix_chars="\0",
        add_help=False,
        help="submit one message from stdin (sendmail-compatible)",
    )
    sendmail.add_argument("sendmail_args", nargs=argparse.REMAINDER)
    return parser


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDR:PORT[/MODE]",
        help="listen here instead of [[listen]] (repeatable)",
    )
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-file", type=Path)


def load_config(path: str | None) -> Config:
    path = path or os.environ.get("TRIO_MTA_CONFIG") or None
    return Config.load(path) if path else Config.default()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        for line in exc.errors:
            print(f"trio-mta: config: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _main(argv: list[str]) -> int:
    if argv[:1] == [WORKER_COMMAND] and len(argv) >= 2:
        return _serve(build_parser().parse_args(["serve", *argv[2:]]), worker=argv[1])
    args = build_parser().parse_args(argv)
    if args.version:  # SPEC §13
        print(f"trio-mta {__version__}")
        return EXIT_OK
    command = args.command or "serve"
    if command == "serve":
        if args.command is None:
            # plain `trio-mta` takes serve's defaults
            args = build_parser().parse_args([*argv, "serve"])
        return _serve(args)
    if command == "sendmail":  # sysexits.h codes, config errors included
        from trio_mta.cli.sendmail import run_sendmail

        return run_sendmail(args.sendmail_args, config_path=args.config)
    if command == "dkim":  # needs no configuration: it makes a key for one
        from trio_mta.cli.dkim import run_dkim_command

        return run_dkim_command(args)
    config = load_config(args.config)
    if command == "check-config":
        return _check_config(config)
    if command == "queue":
        from trio_mta.cli.queue import run_queue_command

        return run_queue_command(config, args)
    if command == "passwd":
        from trio_mta.cli.passwd import run_passwd

        return run_passwd(config, args.user)
    if command == "tls-policy":
        from trio_mta.cli.tlspolicy import run_tls_policy

        return run_tls_policy(config, args.domain)
    raise UsageError(f"trio-mta: unknown command {command}")


def _check_config(config: Config) -> int:
    from trio_mta.config.checks import open_relay_warning
    from trio_mta.config.summary import describe
    from trio_mta.server.startup import build_ssl_context
    from trio_mta.tls import TLSConfigError

    errors = []
    try:
        if config.tls.cert is not None or config.tls.key is not None:
            build_ssl_context(config)
    except TLSConfigError as exc:
        errors.append(str(exc))
    log_problem = _log_file_problem(config, flag=False)
    if log_problem is not None:
        errors.append(log_problem)
    if errors:
        for line in errors:
            print(f"trio-mta: config: {line}", file=sys.stderr)
        return EXIT_USAGE
    source = config.source or "built-in defaults"
    print(f"configuration ok ({source})")
    for line in describe(config):
        print(line)
    warning = open_relay_warning(config)
    if warning is not None:
        print(f"trio-mta: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _log_file_problem(config: Config, *, flag: bool) -> str | None:
    """``[log].file: ...`` (or ``--log-file: ...`` when the flag set it) if it cannot be used."""
    from trio_mta.config.checks import writable_file_problem

    if config.log.file is None:
        return None
    problem = writable_file_problem(config.log.file)
    if problem is None:
        return None
    return f"{'--log-file' if flag else '[log].file'}: {problem}"


def _serve(args: argparse.Namespace, *, worker: str | None = None) -> int:
    """Serve in this process, or supervise ``[server] workers`` processes (SPEC §12).

    ``worker`` is the spec a supervisor hands a worker it starts.
    """
    config = load_config(args.config).with_overrides(
        listen=args.listen,
        state_dir=args.state_dir,
        log_level=args.log_level,
        log_file=args.log_file,
    )
    spec: WorkerSpec | None = None
    if worker is not None:
        from trio_mta.workers.worker import WorkerSpec

        spec = WorkerSpec.from_json(worker)
        log.set_context(worker=spec.index)
    from_flag = args.log_file is not None
    problem = _log_file_problem(config, flag=from_flag)
    if problem is None:
        try:
            log.setup(config.log.level, config.log.file, config.log.format)
        except OSError as error:  # changed since the check: still one line, naming the key
            where = "--log-file" if from_flag else "[log].file"
            problem = f"{where}: cannot open {config.log.file}: {error.strerror or error}"
    if problem is not None:
        print(f"trio-mta: config: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if spec is None and config.server.effective_workers > 1:
            from trio_mta.workers.supervisor import supervise

            return trio.run(supervise, config, _serve_flags(args))
        trio.run(_serve_until_signal, config, args, spec)
    except Exception as raw:
        # Imported here, not above: the supervisor of [server] workers would otherwise
        # load the whole MTA (cryptography, sqlite3, dnspython) only to name these.
        from trio_mta.privileges import PrivilegeDropError
        from trio_mta.queue.store import QueueError
        from trio_mta.server.errors import ListenError
        from trio_mta.tls import TLSConfigError

        exc = _sole_exception(raw)
        if isinstance(exc, ListenError | QueueError | PrivilegeDropError):
            print(f"trio-mta: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        if isinstance(exc, ConfigError):  # e.g. a state_dir the dropped user cannot write
            for line in exc.errors:
                print(f"trio-mta: config: {line}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, TLSConfigError):
            print(f"trio-mta: config: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, OSError):
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"trio-mta: {where}{exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILURE
        raise
    return EXIT_OK


def _serve_flags(args: argparse.Namespace) -> list[str]:
    """``serve``'s flags again, for the workers: they load the same configuration."""
    flags: list[str] = []
    if args.config:
        flags += ["--config", os.path.abspath(args.config)]
    for listen in args.listen or ():
        flags += ["--listen", listen]
    if args.state_dir is not None:
        flags += ["--state-dir", os.path.abspath(args.state_dir)]
    if args.log_level is not None:
        flags += ["--log-level", args.log_level]
    if args.log_file is not None:
        flags += ["--log-file", os.path.abspath(args.log_file)]
    return flags


def _sole_exception(exc: BaseException) -> BaseException:
    """Nurseries wrap errors in groups; a single cause is reported as itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _serve_until_signal(
    config: Config, args: argparse.Namespace, spec: WorkerSpec | None = None
) -> None:
    from trio_mta.mta import serve

    wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    slot = spec.slot() if spec is not None else None
    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as nursery:

            async def run_serve(task_status: trio.TaskStatus[MTA]) -> None:
                await serve(config, worker=slot, task_status=task_status)
                nursery.cancel_scope.cancel()  # stopped: no more signals to watch

            mta: MTA = await nursery.start(run_serve)
            # A supervised worker may get a stop signal twice at once: forwarded by
            # its parent and sent by a service manager to the whole group.
            nursery.start_soon(
                _watch_signals,
                signals,
                mta,
                args,
                nursery.cancel_scope,
                0.0 if spec is None else DUPLICATE_WINDOW,
            )
            if spec is not None:
                from trio_mta.workers.worker import notify_ready, watch_parent

                log.event("worker.ready", pid=os.getpid(), of=spec.count)
                notify_ready(spec)
                nursery.start_soon(watch_parent, spec, mta)


DUPLICATE_WINDOW = 1.0


async def _watch_signals(
    signals: AsyncIterator[int],
    mta: MTA,
    args: argparse.Namespace,
    scope: trio.CancelScope,
    duplicate_window: float = 0.0,
) -> None:
    """SIGHUP: reload. First SIGTERM/SIGINT: graceful stop; a second one: stop now.

    A second stop signal within ``duplicate_window`` seconds of the first is the
    same request delivered twice, not an operator insisting.
    """
    stopping_since: float | None = None
    async for signum in signals:
        log.event("mta.signal", signal=signal.Signals(signum).name)
        if signum == signal.SIGHUP:
            await _reload(mta, args)
            continue
        if stopping_since is not None:
            if trio.current_time() - stopping_since < duplicate_window:
                continue
            scope.cancel()
            return
        stopping_since = trio.current_time()
        mta.stop()


async def _reload(mta: MTA, args: argparse.Namespace) -> None:
    """Re-read the configuration; a broken file is logged and the old one kept."""
    from trio_mta.tls import TLSConfigError

    try:
        new = load_config(args.config).with_overrides(
            listen=args.listen,
            state_dir=args.state_dir,
            log_level=args.log_level,
            log_file=args.log_file,
        )
        await mta.reload(new)
    except ConfigError as exc:
        log.error("config.reload_failed", errors="; ".join(exc.errors))
    except TLSConfigError as exc:
        log.error("config.reload_failed", errors=str(exc))
