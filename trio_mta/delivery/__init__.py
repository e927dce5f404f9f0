"""Delivery agents: where the scheduler's due recipients go.

Each agent implements `DeliveryAgent.deliver(items) -> outcomes` (one Outcome per
item, same order); the agent knows files or SMTP, never how the queue stores
things.
"""

from trio_mta.delivery.maildir import MaildirAgent, UnsafeMailbox, safe_join
from trio_mta.queue.scheduler import DeliveryAgent, DeliveryItem, Outcome

__all__ = [
    "DeliveryAgent",
    "DeliveryItem",
    "MaildirAgent",
    "Outcome",
    "UnsafeMailbox",
    "safe_join",
]
