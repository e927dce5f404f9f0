"""The tests of shop.py: what an application's own suite looks like with trio_mta.

The fixtures come from the trio_mta pytest plugin (installed with trio_mta):
``smtp_capture`` for synchronous code, ``trio_mta_capture`` for trio code,
``fake_dns`` for MX routing. The strategies come from trio_mta.testing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from shop import SHOP, relay_config, send_alert, send_receipt

import trio_mta
from trio_mta.smtp import parse_path
from trio_mta.testing import SMTPCapture, TrioSMTPCapture
from trio_mta.testing.fake_dns import FakeDNS
from trio_mta.testing.strategies import addresses


def test_receipt_is_sent_to_the_customer(smtp_capture: SMTPCapture) -> None:
    send_receipt(
        42, "ann@customer.test", "9.99 EUR", host=smtp_capture.host, port=smtp_capture.port
    )
    (msg,) = smtp_capture.wait_for(1)
    assert msg.sender == SHOP
    assert msg.recipients == ["ann@customer.test"]
    assert msg.message["Subject"] == "Your order #42"
    assert "Total: 9.99 EUR\n.\n" in msg.message.get_content()  # the lone dot survived


def test_receipt_goes_over_verified_tls(smtp_capture: SMTPCapture) -> None:
    send_receipt(
        7,
        "bob@customer.test",
        "1 EUR",
        host="localhost",
        port=smtp_capture.port,
        tls=smtp_capture.ssl_context,
    )
    (msg,) = smtp_capture.wait_for(1)
    assert msg.tls is not None


async def test_alert_from_a_trio_service(trio_mta_capture: TrioSMTPCapture) -> None:
    await send_alert("disk full", host=trio_mta_capture.host, port=trio_mta_capture.port)
    (msg,) = await trio_mta_capture.wait_for(1)
    assert msg.recipients == ["ops@shop.example"]
    assert msg.message["Subject"] == "ALERT: disk full"


async def test_relay_finds_the_customer_mx(
    fake_dns: FakeDNS, trio_mta_capture: TrioSMTPCapture, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The whole outbound path: shop -> relay MTA -> MX lookup -> the customer's server."""
    fake_dns.add("customer.test", "MX", "10 mx.customer.test.")
    fake_dns.add("mx.customer.test", "A", "127.0.0.1")
    config = trio_mta.Config.from_mapping(
        relay_config(tmp_path, nameserver=fake_dns.nameserver, mx_port=trio_mta_capture.port),
        base_dir=tmp_path,
    )
    relay = await nursery.start(trio_mta.serve, config)
    host, port = relay.address("smtp")
    await trio.to_thread.run_sync(
        lambda: send_receipt(1, "cy@customer.test", "5 EUR", host=host, port=port)
    )
    (msg,) = await trio_mta_capture.wait_for(1, timeout=20)
    assert msg.recipients == ["cy@customer.test"]
    assert msg.helo == "relay.shop.example"
    assert ("customer.test.", "MX") in fake_dns.queries


# Property test: one server for all examples (hypothesis runs many per test function).
@pytest.fixture(scope="module")
def capture() -> Iterator[SMTPCapture]:
    with SMTPCapture() as cap:
        yield cap


def canonical(address: str) -> str:
    """One spelling per mailbox ('"ann"@x' is 'ann@x'), as the capture reports them."""
    return str(parse_path(f"<{address}>", smtputf8=True, allow_null=False))


@settings(max_examples=50, deadline=None)
@given(customer=addresses(literals=False))
def test_any_valid_address_gets_its_receipt(capture: SMTPCapture, customer: str) -> None:
    capture.clear()
    send_receipt(1, customer, "1 EUR", host=capture.host, port=capture.port)
    (msg,) = capture.wait_for(1)
    assert msg.recipients == [canonical(customer)]
