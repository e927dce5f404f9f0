"""trio_mta: a mail transfer agent on trio.

The public surface for embedding (SPEC §7)::

    config = trio_mta.Config.load("mta.toml")
    async with trio.open_nursery() as nursery:
        mta = await nursery.start(trio_mta.serve, config)
        print(mta.listeners)

``Handler`` lets an application take messages itself; ``send_message`` is
the SMTP client for one message.
"""

from .client import SendResult, send_message
from .config import Config, ConfigError
from .handler import Envelope, Handler, SessionInfo
from .mta import MTA, Listener, ListenError, serve
from .smtp import Reply

__version__ = "0.1.0"

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
