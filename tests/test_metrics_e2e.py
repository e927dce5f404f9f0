"""The metrics endpoint of a running server, scraped with a real HTTP client."""

from __future__ import annotations

import smtplib
import urllib.request
from collections.abc import Callable

import trio

from trio_mta.config import Config
from trio_mta.mta import MTA, serve

from .maildirs import wait_for_mail


def scrape(host: str, port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_counters_move_after_delivery(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    mta: MTA = await nursery.start(serve, make_config(metrics={"listen": "127.0.0.1:0"}))
    assert mta.metrics_address is not None
    before = await trio.to_thread.run_sync(scrape, *mta.metrics_address)
    assert before['trio_mta_recipients_total{destination="local",outcome="delivered"}'] == 0

    def send() -> None:
        with smtplib.SMTP(*mta.address("smtp"), timeout=10) as client:
            client.sendmail("a@remote.test", ["mia@example.test"], b"Subject: m\r\n\r\nx\r\n")

    await trio.to_thread.run_sync(send)
    await wait_for_mail(mta.config.local.maildir_root, "mia")
    with trio.fail_after(10):
        while True:
            after = await trio.to_thread.run_sync(scrape, *mta.metrics_address)
            if after['trio_mta_recipients_total{destination="local",outcome="delivered"}'] == 1:
                break
            await trio.sleep(0.05)
    assert after['trio_mta_connections_total{listener="smtp",tls="false"}'] >= 1
    assert after['trio_mta_messages_accepted_total{listener="smtp"}'] == 1
    assert after['trio_mta_delivery_latency_seconds_count{destination="local"}'] == 1
    assert after["trio_mta_queue_size"] == 0
