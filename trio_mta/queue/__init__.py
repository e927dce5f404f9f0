"""The durable queue: SQLite store, group-commit writer, delivery scheduler."""

from trio_mta.queue.ids import host_tag, host_tag_for, is_queue_id, new_queue_id
from trio_mta.queue.report import format_list, format_show
from trio_mta.queue.scheduler import (
    DeliveryAgent,
    DeliveryItem,
    Outcome,
    Scheduler,
    backoff_delay,
)
from trio_mta.queue.store import (
    DueRecipient,
    NewMessage,
    NewRecipient,
    QueueError,
    QueueStore,
    RecipientUpdate,
)
from trio_mta.queue.writer import QueueWriter

__all__ = [
    "DeliveryAgent",
    "DeliveryItem",
    "DueRecipient",
    "NewMessage",
    "NewRecipient",
    "Outcome",
    "QueueError",
    "QueueStore",
    "QueueWriter",
    "RecipientUpdate",
    "Scheduler",
    "backoff_delay",
    "format_list",
    "format_show",
    "host_tag",
    "host_tag_for",
    "is_queue_id",
    "new_queue_id",
]
