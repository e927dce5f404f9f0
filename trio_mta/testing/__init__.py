"""trio_mta in the test suites of applications that send or receive mail (SPEC §14).

- :class:`SMTPCapture` / :class:`TrioSMTPCapture`: a real trio_mta SMTP server
  on loopback that accepts everything and keeps every message
  (:class:`CapturedMessage`), for synchronous and trio tests;
- :class:`FakeDNS`: a DNS server on loopback answering records the test adds;
- :mod:`trio_mta.testing.strategies`: hypothesis strategies for domains,
  addresses, messages and SMTP command lines that are valid by the RFCs;
- :mod:`trio_mta.testing.plugin`: the pytest fixtures ``smtp_capture``,
  ``trio_mta_capture`` and ``fake_dns``, loaded automatically (entry point
  ``pytest11``).

Names load on first use (PEP 562): pytest imports this package in every suite
that has trio_mta installed, and that must not cost trio, dnspython or the server.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trio_mta.testing.capture import (
        CapturedMessage,
        MessagesNotReceived,
        SMTPCapture,
        TrioSMTPCapture,
        open_capture,
    )
    from trio_mta.testing.fake_dns import FakeDNS

_LAZY = {
    "CapturedMessage": "trio_mta.testing.capture",
    "MessagesNotReceived": "trio_mta.testing.capture",
    "SMTPCapture": "trio_mta.testing.capture",
    "TrioSMTPCapture": "trio_mta.testing.capture",
    "open_capture": "trio_mta.testing.capture",
    "FakeDNS": "trio_mta.testing.fake_dns",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trio_mta.testing' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CapturedMessage",
    "FakeDNS",
    "MessagesNotReceived",
    "SMTPCapture",
    "TrioSMTPCapture",
    "open_capture",
]
