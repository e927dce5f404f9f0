"""trio_mta: a mail transfer agent on trio.

The public surface for embedding (SPEC §7)::

    config = trio_mta.Config.load("mta.toml")
    async with trio.open_nursery() as nursery:
        mta = await nursery.start(trio_mta.serve, config)
        print(mta.listeners)

``Handler`` lets an application take messages itself; ``send_message`` is
the SMTP client for one message.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trio_mta.client import SendResult, send_message
    from trio_mta.config import Config, ConfigError
    from trio_mta.mta import MTA, Listener, ListenError, serve
    from trio_mta.server.handler import Envelope, Handler, SessionInfo
    from trio_mta.smtp import Reply

__version__ = "0.1.0"

# Loaded on first use (PEP 562), so ``import trio_mta.smtp`` (the sans-IO core) pulls in no
# trio, sqlite3 or dnspython through this package's __init__.
_LAZY = {
    "SendResult": "trio_mta.client",
    "send_message": "trio_mta.client",
    "Config": "trio_mta.config",
    "ConfigError": "trio_mta.config",
    "MTA": "trio_mta.mta",
    "Listener": "trio_mta.mta",
    "ListenError": "trio_mta.mta",
    "serve": "trio_mta.mta",
    "Envelope": "trio_mta.server.handler",
    "Handler": "trio_mta.server.handler",
    "SessionInfo": "trio_mta.server.handler",
    "Reply": "trio_mta.smtp",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trio_mta' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "MTA",
    "Config",
    "ConfigError",
    "Envelope",
    "Handler",
    "ListenError",
    "Listener",
    "Reply",
    "SendResult",
    "SessionInfo",
    "send_message",
    "serve",
]
