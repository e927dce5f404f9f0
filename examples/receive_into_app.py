"""Receive mail inside a trio program with the handler API, without the durable queue.

The application decides each recipient and takes each complete message
itself; trio_mta does the SMTP (framing, limits, STARTTLS, smuggling
defences) and adds a ``Received:`` header. With ``queue=False`` nothing is
written to a queue or a Maildir: once ``handle_message`` answers 250 the
message is the application's.

    python examples/receive_into_app.py --port 2525
    python examples/send_one.py 127.0.0.1 2525 me@example.org you@example.org --tls none

Runs until Ctrl-C (or SIGTERM), then stops gracefully.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import trio

import trio_mta


class PrintingHandler(trio_mta.Handler):
    """Prints sender, recipients and subject of each message, then accepts it."""

    def __init__(self, domains: Sequence[str], out: TextIO) -> None:
        self.domains = {d.lower() for d in domains}  # empty: accept every recipient
        self.out = out
        self.received = 0

    async def handle_rcpt(
        self, session: trio_mta.SessionInfo, envelope: trio_mta.Envelope, address: str
    ) -> trio_mta.Reply | str | None:
        # Answering here (rather than None) bypasses trio_mta's own routing and
        # relay rules: this program is the final destination of whatever it accepts.
        domain = address.rpartition("@")[2].lower()
        if self.domains and domain not in self.domains:
            return trio_mta.Reply(550, "5.1.1", f"<{address}>: not a domain of this application")
        return "250 2.1.5 Ok"

    async def handle_message(
        self, session: trio_mta.SessionInfo, envelope: trio_mta.Envelope, data: bytes
    ) -> trio_mta.Reply | str | None:
        headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(data)
        subject = str(headers.get("Subject", ""))
        recipients = ", ".join(r.address for r in envelope.recipients)
        sender = envelope.sender_address or "<>"
        tls = session.tls or "no TLS"
        print(
            f"message from {sender} to {recipients} subject {subject!r} "
            f"({len(data)} bytes, client {session.client_ip}, {tls})",
            file=self.out,
            flush=True,
        )
        self.received += 1
        # Whatever the application does with the message (store it, hand it to
        # a task) must be done, or safely begun, before this 250: the client
        # forgets the message once it has it.
        return trio_mta.Reply(250, "2.0.0", f"Ok: message {self.received} received")


def make_config(host: str, port: int, state_dir: Path) -> trio_mta.Config:
    """A config built in code: one smtp listener. ``state_dir`` only holds the
    self-signed certificate generated for STARTTLS (no queue is kept)."""
    return trio_mta.Config.from_mapping(
        {
            "state_dir": str(state_dir),
            "listen": [
                {"address": f"[{host}]:{port}" if ":" in host else f"{host}:{port}", "mode": "smtp"}
            ],
        },
        base_dir=Path.cwd(),
    )


async def receive(config: trio_mta.Config, handler: trio_mta.Handler, out: TextIO) -> None:
    """Serve until SIGINT/SIGTERM, then stop gracefully: idle sessions are closed
    with 421, one mid-message may finish. A second signal stops at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def run_server(task_status: trio.TaskStatus[trio_mta.MTA]) -> None:
                await trio_mta.serve(config, handler=handler, queue=False, task_status=task_status)
                nursery.cancel_scope.cancel()  # stopped: no more signals to wait for

            mta: trio_mta.MTA = await nursery.start(run_server)
            for listener in mta.listeners:
                print(
                    f"listening on {listener.host}:{listener.port} ({listener.mode})",
                    file=out,
                    flush=True,
                )
            stopping = False
            async for _ in signals:
                if stopping:
                    nursery.cancel_scope.cancel()
                    return
                print("stopping", file=out, flush=True)
                stopping = True
                mta.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=2525, help="port (0: any free one)")
    parser.add_argument(
        "--domain",
        action="append",
        default=[],
        help="accept only recipients in this domain (repeatable; default: any)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("receive-into-app-data"),
        help="where the self-signed STARTTLS certificate is kept",
    )
    args = parser.parse_args(argv)
    try:
        config = make_config(args.host, args.port, args.state_dir)
    except trio_mta.ConfigError as exc:
        print(f"receive_into_app: {exc}", file=sys.stderr)
        return 2
    handler = PrintingHandler(args.domain, sys.stdout)
    try:
        trio.run(receive, config, handler, sys.stdout)
    except Exception as exc:
        cause = sole_exception(exc)
        if isinstance(cause, trio_mta.ListenError | OSError):
            print(f"receive_into_app: {cause}", file=sys.stderr)  # no traceback for these
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
