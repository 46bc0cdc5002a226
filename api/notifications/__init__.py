"""Devices, the in-app inbox and notification preferences (the outbox and worker are in `notifications/`)."""
