"""Notifications: the transactional outbox, FCM push and the in-app inbox (built in issue 3)."""
