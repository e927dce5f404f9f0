"""The SMTP client on trio: the sans-IO client machine driven over real sockets.

Owns connecting, STARTTLS/implicit TLS by policy, AUTH and transactions
(:mod:`~trio_mta.client.connection`), and ``send_message`` for applications
(:mod:`~trio_mta.client.send`). Must not know the queue: remote delivery
turns what the client reports into outcomes.
"""

from trio_mta.client.connection import (
    SMTPAuthError,
    SMTPClient,
    SMTPClientError,
    SMTPConnectError,
    SMTPDisconnected,
    SMTPResponseError,
    SMTPSendError,
    SMTPTimeout,
    SMTPTLSError,
    Timeouts,
    TLSCheck,
    TLSMode,
    TransactionResult,
)
from trio_mta.client.send import SendResult, send_message

__all__ = [
    "SMTPAuthError",
    "SMTPClient",
    "SMTPClientError",
    "SMTPConnectError",
    "SMTPDisconnected",
    "SMTPResponseError",
    "SMTPSendError",
    "SMTPTLSError",
    "SMTPTimeout",
    "SendResult",
    "TLSCheck",
    "TLSMode",
    "Timeouts",
    "TransactionResult",
    "send_message",
]
