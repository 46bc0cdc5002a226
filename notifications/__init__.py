"""Notifications: the transactional outbox, FCM push and the in-app inbox.

Domain code tells people things with `enqueue` inside its own transaction; the worker
(`notifications.worker`) pushes them; the inbox routes live in `api/notifications/`.
"""

from notifications.outbox import cancel_pending, enqueue

__all__ = ["cancel_pending", "enqueue"]
