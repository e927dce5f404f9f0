"""A tiny application that sends mail, as the example of docs/testing.md tests it.

Two ways an application typically sends: a synchronous web handler with
smtplib (``send_receipt``), and a trio service with ``trio_mta.send_message``
(``send_alert``). ``relay_config`` is the outbound MTA an operator would run
beside it, which finds the customer's mail server by MX lookup.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import trio_mta

SHOP = "orders@shop.example"


def receipt(order_id: int, customer: str, total: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SHOP
    message["To"] = customer
    message["Subject"] = f"Your order #{order_id}"
    message.set_content(f"Thank you for your order.\n\nTotal: {total}\n.\n")
    return message


def send_receipt(
    order_id: int,
    customer: str,
    total: str,
    *,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
) -> None:
    """What a web handler does after checkout: one message over (STARTTLS) SMTP."""
    with smtplib.SMTP(host, port, local_hostname="shop.example", timeout=30) as client:
        if tls is not None:
            client.starttls(context=tls)
        # The envelope recipient is the address as given: smtplib would otherwise read
        # it back from To:, and email.utils unquotes a local part ("."@a becomes .@a).
        client.send_message(receipt(order_id, customer, total), to_addrs=[customer])


async def send_alert(text: str, *, host: str, port: int) -> None:
    """What a trio service does when something needs a human."""
    message = EmailMessage()
    message["From"] = SHOP
    message["To"] = "ops@shop.example"
    message["Subject"] = "ALERT: " + text
    message.set_content(text + "\n")
    await trio_mta.send_message(
        message, host=host, port=port, tls="opportunistic", helo_name="shop.example"
    )


def relay_config(state_dir: Path, *, nameserver: str, mx_port: int) -> dict[str, Any]:
    """The outbound MTA: submissions on loopback, delivery by MX lookup to ``mx_port``."""
    return {
        "hostname": "relay.shop.example",
        "state_dir": str(state_dir),
        "listen": [{"address": "127.0.0.1:0", "mode": "smtp"}],
        "local": {"domains": ["shop.example"]},
        "relay": {"port": mx_port, "tls": "opportunistic"},
        "dns": {"nameservers": [nameserver], "timeout": "2s"},
        "queue": {"retry_initial": "1s"},
    }
