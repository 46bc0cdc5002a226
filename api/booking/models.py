"""Request and response bodies of the booking routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

import msgspec

from api.booking.states import Status

Mode = Literal["in_person", "video"]
ClockTime = Annotated[str, msgspec.Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", examples=["07:30"])]


class WeeklyWindowIn(msgspec.Struct, forbid_unknown_fields=True):
    weekday: Annotated[int, msgspec.Meta(ge=1, le=7, description="ISO weekday: Monday 1 … Sunday 7")]
    start: ClockTime
    end: ClockTime


class ScheduleCreate(msgspec.Struct, forbid_unknown_fields=True):
    facility_id: uuid.UUID
    doctor_id: uuid.UUID
    service_id: uuid.UUID
    weekly: Annotated[list[WeeklyWindowIn], msgspec.Meta(min_length=1, max_length=50)]
    """Working windows in clinic time (Asia/Ho_Chi_Minh)."""
    valid_from: dt.date
    valid_until: dt.date | None = None
    modes: Annotated[list[Mode], msgspec.Meta(min_length=1, max_length=2)] = msgspec.field(
        default_factory=lambda: ["in_person"]
    )
    capacity: Annotated[int, msgspec.Meta(ge=1, le=200)] = 1
    """Patients per slot: 1 for a doctor's visit, more for e.g. a vaccination session."""
    buffer_minutes: Annotated[int, msgspec.Meta(ge=0, le=240)] = 0
    horizon_days: Annotated[int, msgspec.Meta(ge=0, le=366)] = 30
    """How many days ahead slots open."""
    release_time: ClockTime = "07:00"
    """The clinic time each day at which the next day's slots open."""


class ScheduleOut(msgspec.Struct):
    id: uuid.UUID
    facility_id: uuid.UUID
    doctor_id: uuid.UUID
    service_id: uuid.UUID
    weekly: list[WeeklyWindowIn]
    valid_from: dt.date
    valid_until: dt.date | None
    modes: list[Mode]
    capacity: int
    buffer_minutes: int
    horizon_days: int
    release_time: str
    slot_minutes: int
    active: bool


class ScheduleExceptionCreate(msgspec.Struct, forbid_unknown_fields=True):
    day: dt.date
    start: ClockTime | None = None
    """With `end`, only part of the day is off; without both, the whole day."""
    end: ClockTime | None = None
    reason: Annotated[str, msgspec.Meta(max_length=200)] = ""


class ScheduleExceptionOut(msgspec.Struct):
    id: uuid.UUID
    schedule_id: uuid.UUID
    day: dt.date
    start: str | None
    end: str | None
    reason: str


class SlotOut(msgspec.Struct):
    doctor_id: uuid.UUID
    service_id: uuid.UUID
    facility_id: uuid.UUID
    start: dt.datetime
    end: dt.datetime
    modes: list[Mode]
    remaining: int
    """Places left in this slot (capacity minus bookings and live holds)."""


class Availability(msgspec.Struct):
    slots: list[SlotOut]


class AppointmentCreate(msgspec.Struct, forbid_unknown_fields=True):
    doctor_id: uuid.UUID
    service_id: uuid.UUID
    start: dt.datetime
    """A slot's start as listed by /v1/availability, with its offset."""
    mode: Mode = "in_person"
    patient_id: uuid.UUID | None = None
    """The caller (default) or one of the caller's dependents."""
    reason: Annotated[str, msgspec.Meta(max_length=500)] | None = None


class Reschedule(msgspec.Struct, forbid_unknown_fields=True):
    start: dt.datetime


class CheckIn(msgspec.Struct, forbid_unknown_fields=True):
    cccd_qr: Annotated[str, msgspec.Meta(max_length=1000)] | None = None
    """The text of the QR code on the patient's chip ID card, scanned at the desk."""


class AppointmentOut(msgspec.Struct):
    id: uuid.UUID
    status: Status
    patient_id: uuid.UUID
    facility_id: uuid.UUID
    doctor_id: uuid.UUID
    service_id: uuid.UUID
    start: dt.datetime
    end: dt.datetime
    mode: Mode
    hold_expires_at: dt.datetime | None = None
    invoice_id: uuid.UUID | None = None
    queue_number: int | None = None
    reason: str | None = None


class AppointmentPage(msgspec.Struct):
    items: list[AppointmentOut]
    next_cursor: str | None


class WaitlistCreate(msgspec.Struct, forbid_unknown_fields=True):
    facility_id: uuid.UUID
    date_from: dt.date
    date_to: dt.date
    doctor_id: uuid.UUID | None = None
    service_id: uuid.UUID | None = None
    mode: Mode | None = None
    patient_id: uuid.UUID | None = None


class WaitlistOut(msgspec.Struct):
    id: uuid.UUID
    status: Literal["waiting", "offered", "accepted", "lapsed", "cancelled"]
    patient_id: uuid.UUID
    facility_id: uuid.UUID
    doctor_id: uuid.UUID | None
    service_id: uuid.UUID | None
    date_from: dt.date
    date_to: dt.date
    mode: Mode | None
    offer: AppointmentOut | None = None
    """While offered: the slot held for this entry until `offer.hold_expires_at`."""
