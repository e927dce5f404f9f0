"""The pytest plugin (entry point ``pytest11: trio_mta``): ``smtp_capture``,
``trio_mta_capture`` and ``fake_dns``.

pytest loads this module in every suite of every project that has trio_mta
installed, so it imports nothing but pytest: trio, dnspython and the server
are imported by a fixture when a test asks for it, and a suite that never does
pays nothing. ``trio_mta_capture`` is for trio tests and so needs pytest-trio
(its ``nursery`` fixture); pytest says so when a test uses it without.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import trio

    from trio_mta.testing.capture import SMTPCapture, TrioSMTPCapture
    from trio_mta.testing.fake_dns import FakeDNS

__all__ = ["fake_dns", "smtp_capture", "trio_mta_capture"]


@pytest.fixture
def smtp_capture() -> Iterator[SMTPCapture]:
    """A capture SMTP server on 127.0.0.1 (free port) in a thread, for synchronous tests.

    ``.host``, ``.port``, ``.messages``, ``.wait_for(n, timeout=5.0)``, ``.clear()``,
    ``.ssl_context`` / ``.cafile`` to verify its STARTTLS certificate.
    """
    from trio_mta.testing.capture import SMTPCapture

    with SMTPCapture() as capture:
        yield capture


@pytest.fixture
def fake_dns() -> Iterator[FakeDNS]:
    """A DNS server on 127.0.0.1 (UDP and TCP, free port) answering what the test adds:
    ``fake_dns.add("example.test", "MX", "10 mx.example.test.")``; put
    ``fake_dns.nameserver`` in ``[dns] nameservers``."""
    from trio_mta.testing.fake_dns import FakeDNS

    with FakeDNS() as server:
        yield server


@pytest.fixture
async def trio_mta_capture(nursery: trio.Nursery) -> AsyncIterator[TrioSMTPCapture]:
    """A capture SMTP server served from the test's nursery (pytest-trio):
    ``await trio_mta_capture.wait_for(n)``."""
    from trio_mta.testing.capture import TrioSMTPCapture

    capture: TrioSMTPCapture = await nursery.start(TrioSMTPCapture().serve)
    yield capture
    await capture.aclose()
