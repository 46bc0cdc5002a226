"""This process's copy of doctors' schedules, to find the slot a booking asks for without a query.

Used optimistically: each copy carries the doctor's schedules version (slot_versions, day
'-infinity', migration 0006) read before the schedules, and `book_appointment` refuses with
`stale` when the version has moved on since; the booking then reads them again. A slot that the
copy says does not exist is checked against a fresh read before the booking is refused.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import OrderedDict
from typing import NamedTuple

from api.booking import queries
from api.booking.slots import Schedule, ScheduleException, Slot, find_slot, is_open
from api.booking.versions import Coalesced
from api.clinic_time import clinic_time
from api.db import FairPool


class DoctorSchedules(NamedTuple):
    version: int
    schedules: list[Schedule]
    """Active, of one doctor for one service."""
    exceptions: dict[uuid.UUID, list[ScheduleException]]
    """From the day before the read on."""
    prepaid: bool
    """The service is paid before the visit: a booking is `held` first."""

    def find(self, mode: str, start: dt.datetime, now: dt.datetime) -> tuple[Schedule, Slot] | str:
        """The schedule and slot a booking asks for, or why not: `not_a_slot`, `slot_not_open`."""
        if start.tzinfo is None:
            return "not_a_slot"
        for schedule in self.schedules:
            if mode not in schedule.modes:
                continue
            slot = find_slot(schedule, self.exceptions.get(schedule.id, []), start)
            if slot is not None:
                if not is_open(schedule, slot, now):
                    return "slot_not_open"
                return schedule, slot
        return "not_a_slot"


class ScheduleCache:
    def __init__(self, pool: FairPool, max_entries: int = 10_000) -> None:
        self._pool = pool
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[uuid.UUID, uuid.UUID], DoctorSchedules] = OrderedDict()
        # Concurrent misses share one read: when a clinic's slots open, a thousand requests for
        # ten doctors make a few reads, not a thousand.
        self._reads: Coalesced[tuple[uuid.UUID, uuid.UUID], DoctorSchedules] = Coalesced(self._read)

    async def get(
        self, doctor_id: uuid.UUID, service_id: uuid.UUID, *, fresh: bool = False
    ) -> DoctorSchedules:
        """The copy; with `fresh`, one read after this call."""
        key = (doctor_id, service_id)
        if not fresh and (kept := self._entries.get(key)) is not None:
            return kept
        return await self._reads.get(key)

    async def _read(self, key: tuple[uuid.UUID, uuid.UUID]) -> DoctorSchedules:
        doctor_id, service_id = key
        yesterday = clinic_time(dt.datetime.now(dt.UTC)).date() - dt.timedelta(days=1)
        async with self._pool.acquire() as conn:
            version, prepaid, schedules, exceptions = await queries.doctor_schedules(
                conn, doctor_id, service_id, yesterday
            )
        entry = DoctorSchedules(version, schedules, exceptions, prepaid)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return entry
