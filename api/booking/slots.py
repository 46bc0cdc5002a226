"""Slots are computed from a schedule's weekly template, never stored: a plain function of the
schedule, its exceptions and the dates asked for.

Everything is clinic time (Asia/Ho_Chi_Minh, no daylight saving), so a slot at 23:30 on
1 December is on 1 December for the clinic even though it is 16:30 UTC.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator, Sequence

import msgspec

from api.clinic_time import CLINIC_TZ, clinic_time


class WeeklyWindow(msgspec.Struct, frozen=True):
    weekday: int
    """ISO weekday: Monday 1 … Sunday 7."""
    start: dt.time
    end: dt.time


class ScheduleException(msgspec.Struct, frozen=True):
    day: dt.date
    start: dt.time | None = None
    """With `end`: only this part of the day is off; both None: the whole day."""
    end: dt.time | None = None


class Schedule(msgspec.Struct, frozen=True):
    id: uuid.UUID
    facility_id: uuid.UUID
    doctor_id: uuid.UUID
    service_id: uuid.UUID
    weekly: tuple[WeeklyWindow, ...]
    duration_minutes: int
    capacity: int
    buffer_minutes: int
    modes: frozenset[str]
    horizon_days: int
    release_time: dt.time
    valid_from: dt.date
    valid_until: dt.date | None


class Slot(msgspec.Struct, frozen=True):
    start: dt.datetime
    end: dt.datetime


def days(date_from: dt.date, date_to: dt.date) -> Iterator[dt.date]:
    day = date_from
    while day <= date_to:
        yield day
        day += dt.timedelta(days=1)


def slots(
    schedule: Schedule, exceptions: Sequence[ScheduleException], date_from: dt.date, date_to: dt.date
) -> Iterator[Slot]:
    """The schedule's slots on the clinic days `date_from`..`date_to`, in order.

    Each window is cut into slots of the service's length, `buffer_minutes` apart; a slot
    must end inside its window, and a slot touching an exception is left out.
    """
    length = dt.timedelta(minutes=schedule.duration_minutes)
    step = length + dt.timedelta(minutes=schedule.buffer_minutes)
    first = max(date_from, schedule.valid_from)
    last = min(date_to, schedule.valid_until) if schedule.valid_until else date_to
    off: dict[dt.date, list[ScheduleException]] = {}
    for exception in exceptions:
        off.setdefault(exception.day, []).append(exception)
    for day in days(first, last):
        closed = off.get(day, [])
        if any(e.start is None for e in closed):
            continue
        for window in sorted(
            (w for w in schedule.weekly if w.weekday == day.isoweekday()), key=lambda w: w.start
        ):
            start = dt.datetime.combine(day, window.start, tzinfo=CLINIC_TZ)
            window_end = dt.datetime.combine(day, window.end, tzinfo=CLINIC_TZ)
            while start + length <= window_end:
                end = start + length
                if not any(_overlaps(day, e, start, end) for e in closed):
                    yield Slot(start, end)
                start += step


def _overlaps(day: dt.date, exception: ScheduleException, start: dt.datetime, end: dt.datetime) -> bool:
    assert exception.start is not None and exception.end is not None
    off_start = dt.datetime.combine(day, exception.start, tzinfo=CLINIC_TZ)
    off_end = dt.datetime.combine(day, exception.end, tzinfo=CLINIC_TZ)
    return start < off_end and off_start < end


def last_open_day(schedule: Schedule, now: dt.datetime) -> dt.date:
    """The last clinic day whose slots can be booked at `now`.

    With a 30-day horizon released at 07:00, at 06:59 on 1 December bookings reach 30 December
    and at 07:00 they reach 31 December: the morning a popular clinic releases its slots.
    """
    local = clinic_time(now)
    released_today = local.time().replace(tzinfo=None) >= schedule.release_time
    return local.date() + dt.timedelta(days=schedule.horizon_days - (0 if released_today else 1))


def find_slot(schedule: Schedule, exceptions: Sequence[ScheduleException], start: dt.datetime) -> Slot | None:
    """The schedule's slot beginning exactly at `start`, if there is one: the one `slots` would
    list for that day, found without listing the day."""
    start = clinic_time(start)  # same zone as the slots: a cheaper comparison
    day = start.date()
    if day < schedule.valid_from or (schedule.valid_until is not None and day > schedule.valid_until):
        return None
    length = dt.timedelta(minutes=schedule.duration_minutes)
    step = length + dt.timedelta(minutes=schedule.buffer_minutes)
    end = start + length
    for window in schedule.weekly:
        if window.weekday != day.isoweekday():
            continue
        offset = start - dt.datetime.combine(day, window.start, tzinfo=CLINIC_TZ)
        if (
            offset >= dt.timedelta()
            and not offset % step
            and end <= dt.datetime.combine(day, window.end, tzinfo=CLINIC_TZ)
        ):
            closed = [e for e in exceptions if e.day == day]
            if any(e.start is None for e in closed) or any(_overlaps(day, e, start, end) for e in closed):
                return None
            return Slot(start, end)
    return None


def is_open(schedule: Schedule, slot: Slot, now: dt.datetime) -> bool:
    """Bookable now: in the future and already released."""
    return slot.start > now and clinic_time(slot.start).date() <= last_open_day(schedule, now)
