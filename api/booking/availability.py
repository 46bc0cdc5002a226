"""Free slots: the schedules' slots minus bookings and live holds.

Nothing is pre-generated in the database, and nothing shown is older than the request: a
schedule change or a cancelled visit shows at once. What is reused is kept per process and
checked against the versions PostgreSQL keeps (api/booking/versions.py) before every use:

- a `Template` per query: the schedules' slots in the range, already sorted and JSON-encoded,
  valid while the doctors' schedules version is unchanged;
- the answer itself (the response body), valid while the places version of those days is
  unchanged and until the first moment time alone changes it: the first listed slot starts,
  a live hold runs out, or a release opens another day.

The range is bounded (31 days) so one request stays cheap even when nothing is cached.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import functools
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import asyncpg
import msgspec

from api.booking import queries
from api.booking.models import SlotOut
from api.booking.slots import Schedule, ScheduleException, last_open_day, slots
from api.booking.versions import Coalesced, Scope, Versions, read_versions
from api.clinic_time import CLINIC_TZ
from api.db import FairPool
from api.errors import ApiError

MAX_DAYS = 31
_ENCODE = msgspec.json.Encoder()


class Query(NamedTuple):
    doctor_id: uuid.UUID | None
    facility_id: uuid.UUID | None
    service_id: uuid.UUID | None
    date_from: dt.date
    date_to: dt.date
    mode: str | None


def check(query: Query) -> None:
    if query.doctor_id is None and query.facility_id is None:
        raise ApiError("validation_failed")
    if query.date_to < query.date_from or (query.date_to - query.date_from).days >= MAX_DAYS:
        raise ApiError("invalid_date_range")


class _Candidate(NamedTuple):
    start: float
    """Epoch seconds: comparisons of floats, not of aware datetimes (about 1 µs each)."""
    end: float
    doctor_id: uuid.UUID
    schedule: int
    """Index into Template.schedules."""
    day: dt.date
    capacity: int
    head: bytes
    """The slot's JSON up to the value of `remaining`."""


class Template:
    """The schedules' slots for one query, before bookings and time are taken into account."""

    def __init__(
        self,
        versions: Versions,
        schedules: Sequence[Schedule],
        exceptions: dict[uuid.UUID, list[ScheduleException]],
        query: Query,
    ) -> None:
        self.versions = versions
        self.schedules = [s for s in schedules if query.mode is None or query.mode in s.modes]
        self.doctor_ids = sorted({s.doctor_id for s in self.schedules})
        self.range_start = dt.datetime.combine(query.date_from, dt.time(), tzinfo=CLINIC_TZ)
        self.range_end = dt.datetime.combine(
            query.date_to + dt.timedelta(days=1), dt.time(), tzinfo=CLINIC_TZ
        )
        self.last_day = [dt.date.min] * len(self.schedules)
        candidates: list[tuple[dt.datetime, str, _Candidate]] = []
        for index, schedule in enumerate(self.schedules):
            modes = sorted(schedule.modes)
            for slot in slots(schedule, exceptions.get(schedule.id, []), query.date_from, query.date_to):
                encoded = _ENCODE.encode(
                    SlotOut(
                        doctor_id=schedule.doctor_id,
                        service_id=schedule.service_id,
                        facility_id=schedule.facility_id,
                        start=slot.start,
                        end=slot.end,
                        modes=modes,  # type: ignore[arg-type]
                        remaining=0,
                    )
                )
                assert encoded.endswith(b'"remaining":0}')
                day = slot.start.date()
                self.last_day[index] = max(self.last_day[index], day)
                candidates.append(
                    (
                        slot.start,
                        str(schedule.doctor_id),
                        _Candidate(
                            slot.start.timestamp(),
                            slot.end.timestamp(),
                            schedule.doctor_id,
                            index,
                            day,
                            schedule.capacity,
                            encoded[:-2],
                        ),
                    )
                )
        candidates.sort(key=lambda c: (c[0], c[1]))  # stable: a doctor's schedules keep their order
        self.candidates = [c[2] for c in candidates]
        self.starts = [c.start for c in self.candidates]
        self.size = sum(len(c.head) + 150 for c in self.candidates)

    def answer(self, occupied: Sequence[asyncpg.Record], now: float) -> tuple[list[bytes], float]:
        """The free slots' JSON at `now` given the places taken, and until when that holds.

        `occupied`: (doctor_id, start, end, hold_expires) in epoch seconds, by doctor and start.
        """
        valid_until = math.inf
        busy: dict[uuid.UUID, tuple[list[float], list[float], float]] = {}
        for doctor_id, start, end, hold_expires in occupied:
            starts, ends, longest = busy.get(doctor_id) or ([], [], 0.0)
            starts.append(start)
            ends.append(end)
            busy[doctor_id] = (starts, ends, max(longest, end - start))
            if hold_expires is not None:
                valid_until = min(valid_until, hold_expires)  # the hold stops counting then
        clinic_now = dt.datetime.fromtimestamp(now, CLINIC_TZ)
        open_until = [last_open_day(s, clinic_now) for s in self.schedules]
        for index, schedule in enumerate(self.schedules):
            if self.last_day[index] > open_until[index]:  # another day opens at the next release
                valid_until = min(valid_until, _next_release(schedule, clinic_now))
        free: list[bytes] = []
        nothing: tuple[list[float], list[float], float] = ([], [], 0.0)
        for slot in self.candidates[bisect.bisect_right(self.starts, now) :]:
            if slot.day > open_until[slot.schedule]:
                continue
            starts, ends, longest = busy.get(slot.doctor_id, nothing)
            # Appointments overlapping the slot start before its end and end after its start.
            used = 0
            i = bisect.bisect_left(starts, slot.end) - 1
            while i >= 0 and starts[i] > slot.start - longest:
                used += ends[i] > slot.start
                i -= 1
            remaining = slot.capacity - used
            if remaining > 0:
                if not free:
                    valid_until = min(valid_until, slot.start)  # listed until it begins
                free.append(b"%s%d}" % (slot.head, remaining))
        return free, valid_until


def _next_release(schedule: Schedule, now: dt.datetime) -> float:
    """The next moment `last_open_day(schedule, ·)` moves on: the next `release_time`, clinic time."""
    release = dt.datetime.combine(now.date(), schedule.release_time, tzinfo=CLINIC_TZ)
    if release <= now:
        release += dt.timedelta(days=1)
    return release.timestamp()


def body(free: list[bytes]) -> bytes:
    """`Availability` as JSON, from the slots' JSON."""
    return b'{"slots":[' + b",".join(free) + b"]}"


async def load_template(conn: asyncpg.Connection, query: Query, versions: Versions) -> Template:
    """Read after `versions` was: the template covers at least that version."""
    schedules, exceptions = await queries.bookable_schedules(
        conn,
        doctor_id=query.doctor_id,
        facility_id=query.facility_id,
        service_id=query.service_id,
        date_from=query.date_from,
        date_to=query.date_to,
    )
    return Template(versions, schedules, exceptions, query)


class _Answer(NamedTuple):
    versions: Versions
    body: bytes
    valid_until: float


class AvailabilityCache:
    """GET /v1/availability answers of this process, each checked against the versions first.

    Concurrent requests for one query share the version read and the computation (one at a time
    per query, joined by every request whose version it covers). Bounded: least recently used out.
    """

    def __init__(self, pool: FairPool, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._pool = pool
        self._max_bytes = max_bytes
        self._bytes = 0
        self._versions: Coalesced[Scope, Versions] = Coalesced(lambda scope: read_versions(pool, scope))
        self._answers: OrderedDict[Query, _Answer] = OrderedDict()
        self._templates: OrderedDict[Query, Template] = OrderedDict()
        self._computing: dict[Query, tuple[Versions, asyncio.Task[_Answer]]] = {}

    async def answer(self, query: Query) -> bytes:
        check(query)
        scope = Scope(
            query.doctor_id,
            None if query.doctor_id is not None else query.facility_id,
            query.date_from,
            query.date_to,
        )
        versions = await self._versions.get(scope)
        cached = self._answers.get(query)
        if cached is not None and cached.versions.covers(versions) and time.time() < cached.valid_until:
            self._answers.move_to_end(query)
            return cached.body
        result = await self._computed(query, versions)
        if time.time() >= result.valid_until:  # time moved on while it was computed: once more
            result = await self._computed(query, versions)
        return result.body

    async def _computed(self, query: Query, versions: Versions) -> _Answer:
        computing = self._computing.get(query)
        if computing is None or not computing[0].covers(versions):
            # A task of its own: a request that goes away does not cancel it for the others.
            task = asyncio.get_running_loop().create_task(self._compute(query, versions))
            computing = self._computing[query] = (versions, task)
            task.add_done_callback(functools.partial(self._computed_one, query))
        return await asyncio.shield(computing[1])

    def _computed_one(self, query: Query, task: asyncio.Task[_Answer]) -> None:
        if (computing := self._computing.get(query)) is not None and computing[1] is task:
            del self._computing[query]

    async def _compute(self, query: Query, versions: Versions) -> _Answer:
        async with self._pool.acquire() as conn:
            template = self._templates.get(query)
            if template is None or not template.versions.covers(versions):
                template = await load_template(conn, query, versions)
                self._keep(self._templates, query, template, template.size)
            occupied = (
                await queries.occupancy_epochs(
                    conn, template.doctor_ids, template.range_start, template.range_end
                )
                if template.doctor_ids
                else []
            )
        free, valid_until = template.answer(occupied, time.time())
        result = _Answer(versions, body(free), valid_until)
        cached = self._answers.get(query)
        if cached is None or versions.covers(cached.versions):  # never displace a newer answer
            self._keep(self._answers, query, result, len(result.body))
        return result

    def _keep(
        self,
        store: OrderedDict[Query, _Answer] | OrderedDict[Query, Template],
        query: Query,
        value: object,
        size: int,
    ) -> None:
        old = store.pop(query, None)
        if old is not None:
            self._bytes -= _size(old)
        store[query] = value  # type: ignore[assignment]
        self._bytes += size
        while self._bytes > self._max_bytes:
            for oldest in (self._answers, self._templates):
                if oldest:
                    _, evicted = oldest.popitem(last=False)
                    self._bytes -= _size(evicted)
            if not self._answers and not self._templates:
                break


def _size(value: object) -> int:
    if isinstance(value, _Answer):
        return len(value.body)
    assert isinstance(value, Template)
    return value.size
