"""Free slots, computed on request from schedules minus bookings and live holds.

Nothing is pre-generated: a schedule change or a cancelled visit shows at once. The range is
bounded (31 days) so one request stays cheap.
"""

from __future__ import annotations

import bisect
import datetime as dt
import uuid

import asyncpg

from api.booking import queries
from api.booking.models import SlotOut
from api.booking.slots import last_open_day, slots
from api.clinic_time import CLINIC_TZ, clinic_time
from api.errors import ApiError

MAX_DAYS = 31


async def free_slots(
    conn: asyncpg.Connection,
    *,
    doctor_id: uuid.UUID | None,
    facility_id: uuid.UUID | None,
    service_id: uuid.UUID | None,
    date_from: dt.date,
    date_to: dt.date,
    mode: str | None,
    now: dt.datetime,
) -> list[SlotOut]:
    if doctor_id is None and facility_id is None:
        raise ApiError("validation_failed")
    if date_to < date_from or (date_to - date_from).days >= MAX_DAYS:
        raise ApiError("invalid_date_range")
    schedules, exceptions = await queries.bookable_schedules(
        conn,
        doctor_id=doctor_id,
        facility_id=facility_id,
        service_id=service_id,
        date_from=date_from,
        date_to=date_to,
    )
    schedules = [s for s in schedules if mode is None or mode in s.modes]
    if not schedules:
        return []
    range_start = dt.datetime.combine(date_from, dt.time(), tzinfo=CLINIC_TZ)
    range_end = dt.datetime.combine(date_to + dt.timedelta(days=1), dt.time(), tzinfo=CLINIC_TZ)
    # Everything in clinic time before comparing: comparing datetimes of two different zones
    # costs about twenty times more, and there are hundreds of comparisons per request.
    now = clinic_time(now)
    taken: dict[uuid.UUID, list[tuple[dt.datetime, dt.datetime]]] = {}
    for row in await queries.occupancy(conn, list({s.doctor_id for s in schedules}), range_start, range_end):
        taken.setdefault(row["doctor_id"], []).append(
            (clinic_time(row["starts_at"]), clinic_time(row["ends_at"]))
        )
    free: list[SlotOut] = []
    for schedule in schedules:
        busy = taken.get(schedule.doctor_id, [])
        starts = [start for start, _ in busy]
        longest = max((end - start for start, end in busy), default=dt.timedelta())
        modes = sorted(schedule.modes)
        last_day = min(date_to, last_open_day(schedule, now))
        for slot in slots(schedule, exceptions.get(schedule.id, []), date_from, last_day):
            if slot.start <= now:
                continue
            # Appointments overlapping the slot start before its end and end after its start.
            used = 0
            i = bisect.bisect_left(starts, slot.end) - 1
            while i >= 0 and starts[i] > slot.start - longest:
                used += busy[i][1] > slot.start
                i -= 1
            remaining = schedule.capacity - used
            if remaining > 0:
                free.append(
                    SlotOut(
                        doctor_id=schedule.doctor_id,
                        service_id=schedule.service_id,
                        facility_id=schedule.facility_id,
                        start=slot.start,
                        end=slot.end,
                        modes=modes,  # type: ignore[arg-type]
                        remaining=remaining,
                    )
                )
    free.sort(key=lambda s: (s.start, str(s.doctor_id)))
    return free
