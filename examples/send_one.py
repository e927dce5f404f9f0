"""Send one message with ``trio_mta.send_message``, the SMTP client API.

    python examples/send_one.py 127.0.0.1 2525 me@example.org you@example.org --tls none
    python examples/send_one.py mx.example.org 25 me@example.org you@example.org
    SMTP_PASSWORD=secret python examples/send_one.py mx.example.org 465 \\
        alice@example.org bob@example.net --tls implicit --user alice

TLS (``--tls``): ``opportunistic`` (default) uses STARTTLS when offered
without checking the certificate and falls back to plain text if the
handshake fails; ``required`` insists on encryption; ``verify`` also checks
the certificate against ``--cafile`` (or the system store) and the host name;
``implicit`` is TLS from the first byte (port 465, verified); ``none`` never
encrypts. AUTH refuses to send a password without TLS unless ``--tls none``.

Exit status: 0 when every recipient was accepted, 1 when some or all were
refused or the server could not be reached, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import email.message
import email.utils
import getpass
import os
import ssl
import sys
from collections.abc import Sequence
from typing import get_args

import trio

import trio_mta
from trio_mta.client import SMTPClientError, SMTPSendError, TLSMode


def build_message(
    sender: str, recipients: Sequence[str], subject: str, body: str
) -> email.message.EmailMessage:
    message = email.message.EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(localtime=True)
    message["Message-ID"] = email.utils.make_msgid()
    message.set_content(body)
    return message


def tls_context(mode: TLSMode, cafile: str | None) -> ssl.SSLContext | None:
    """A verifying context for ``--cafile`` (a private CA); None lets send_message choose."""
    if cafile is None or mode not in ("verify", "implicit"):
        return None
    return ssl.create_default_context(cafile=cafile)


async def send(args: argparse.Namespace, password: str | None) -> trio_mta.SendResult:
    message = build_message(args.sender, args.recipients, args.subject, args.body)
    return await trio_mta.send_message(
        message,
        sender=args.sender,
        recipients=args.recipients,
        host=args.host,
        port=args.port,
        tls=args.tls,
        ssl_context=tls_context(args.tls, args.cafile),
        server_hostname=args.server_hostname,
        username=args.user,
        password=password,
        helo_name=args.helo,
    )


def report(result: trio_mta.SendResult) -> int:
    print(f"server {result.peer} ({result.tls or 'no TLS'})")
    if result.reply is not None:
        print(f"  message: {result.reply}")
    if result.accepted:
        print(f"  accepted: {', '.join(result.accepted)}")
    for address, reply in result.refused.items():
        print(f"  refused {address}: {reply}")
    return 0 if not result.refused else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("host", help="server name or address")
    parser.add_argument("port", type=int, help="25 (MX), 587 (submission), 465 (smtps)")
    parser.add_argument("sender", help="envelope sender and From:")
    parser.add_argument("recipients", nargs="+", help="envelope recipients and To:")
    parser.add_argument("--tls", choices=get_args(TLSMode), default="opportunistic")
    parser.add_argument("--cafile", help="trust these CA certificates (verify, implicit)")
    parser.add_argument("--server-hostname", help="name the certificate must carry (default: host)")
    parser.add_argument(
        "--user", help="log in (AUTH); the password comes from $SMTP_PASSWORD or is asked for"
    )
    parser.add_argument("--helo", help="name for EHLO (default: this machine's host name)")
    parser.add_argument("--subject", default="Test message from trio_mta")
    parser.add_argument("--body", default="Hello from examples/send_one.py.\n")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    password = None
    if args.user is not None:
        password = os.environ.get("SMTP_PASSWORD")
        if password is None:
            password = getpass.getpass(f"Password for {args.user}: ")
    try:
        result = trio.run(send, args, password)
    except SMTPSendError as exc:
        report(exc.result)
        return 1
    except SMTPClientError as exc:
        print(f"send_one: {exc} (status {exc.status})", file=sys.stderr)
        return 1
    except (ValueError, ssl.SSLError, OSError) as exc:
        print(f"send_one: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    return report(result)


if __name__ == "__main__":
    sys.exit(main())
