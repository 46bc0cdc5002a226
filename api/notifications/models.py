"""Request and response bodies of the notification routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

import msgspec

from api.identity.models import Locale

Platform = Literal["android", "ios", "web"]
ClockTime = Annotated[str, msgspec.Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", examples=["22:00"])]


class DeviceRegistration(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    """The FCM registration token of this app install."""
    platform: Platform
    locale: Locale = "vi"
    """Language of the pushes this device shows."""


class DeviceOut(msgspec.Struct):
    id: uuid.UUID
    platform: Platform
    locale: Locale
    active: bool
    """False once FCM said the token no longer works; registering it again reactivates it."""
    created_at: dt.datetime
    updated_at: dt.datetime


class QuietHours(msgspec.Struct, forbid_unknown_fields=True):
    """Clinic time (Asia/Ho_Chi_Minh); may wrap midnight. Pushes due inside are sent at `end`."""

    start: ClockTime
    end: ClockTime


class CategorySwitches(msgspec.Struct, forbid_unknown_fields=True):
    """Which kinds of push to receive. Switched-off categories still reach the inbox, and a
    reminder 15 minutes before a visit or a doctor opening the video visit always goes out."""

    appointments: bool = True
    payments: bool = True
    consultations: bool = True
    health_book: bool = True


class NotificationPreferences(msgspec.Struct, forbid_unknown_fields=True):
    quiet_hours: QuietHours | None = None
    categories: CategorySwitches = msgspec.field(default_factory=CategorySwitches)


class NotificationOut(msgspec.Struct):
    id: uuid.UUID
    kind: str
    category: str
    title: str
    body: str
    data: dict[str, str]
    """The ids to fetch the details with (appointment_id, invoice_id, ...)."""
    created_at: dt.datetime
    read_at: dt.datetime | None


class NotificationPage(msgspec.Struct):
    items: list[NotificationOut]
    next_cursor: str | None


class DeadLetterOut(msgspec.Struct):
    id: uuid.UUID
    user_id: uuid.UUID
    kind: str
    state: Literal["dead", "pending"]
    attempts: int
    last_error: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


class DeadLetterPage(msgspec.Struct):
    items: list[DeadLetterOut]
    next_cursor: str | None
