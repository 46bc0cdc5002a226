"""The availability's fast paths against the plain algorithms they replace (no database).

`Template.answer` (slots pre-encoded, epoch seconds, a validity time) must give byte for byte what
the straightforward computation gives — every schedule's slots in the range, minus the past, the
unreleased and the full, sorted by start and doctor — and the answer must hold, unchanged, for as
long as it says. `find_slot` must find exactly the slot `slots` would list.
"""

from __future__ import annotations

import datetime as dt
import uuid

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from api.booking.availability import Query, Template, body
from api.booking.models import Availability, SlotOut
from api.booking.slots import Schedule, ScheduleException, WeeklyWindow, find_slot, last_open_day, slots
from api.clinic_time import CLINIC_TZ

FIRST_DAY = dt.date(2026, 3, 2)  # a Monday
DOCTORS = [uuid.UUID(int=i + 1) for i in range(3)]
FACILITY = uuid.UUID(int=100)
SERVICE = uuid.UUID(int=200)


def _time(minutes: int) -> dt.time:
    return dt.time(minutes // 60, minutes % 60)


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    windows = []
    for _ in range(draw(st.integers(1, 3))):
        start = draw(st.integers(0, 22 * 60)) // 5 * 5
        end = min(start + draw(st.integers(5, 240)) // 5 * 5, 23 * 60 + 55)
        windows.append(WeeklyWindow(draw(st.integers(1, 7)), _time(start), _time(end)))
    return Schedule(
        id=uuid.uuid4(),
        facility_id=FACILITY,
        doctor_id=draw(st.sampled_from(DOCTORS)),
        service_id=SERVICE,
        weekly=tuple(windows),
        duration_minutes=draw(st.sampled_from([10, 15, 20, 30, 45])),
        capacity=draw(st.integers(1, 3)),
        buffer_minutes=draw(st.sampled_from([0, 0, 5, 10])),
        modes=frozenset(draw(st.sampled_from([["in_person"], ["video"], ["in_person", "video"]]))),
        horizon_days=draw(st.integers(0, 8)),
        release_time=_time(draw(st.integers(0, 23 * 60 + 59))),
        valid_from=FIRST_DAY + dt.timedelta(days=draw(st.integers(-3, 4))),
        valid_until=draw(st.none() | st.just(FIRST_DAY + dt.timedelta(days=draw(st.integers(2, 10))))),
    )


@st.composite
def exceptions(draw: st.DrawFn, schedule: Schedule) -> list[ScheduleException]:
    found = []
    for _ in range(draw(st.integers(0, 2))):
        day = FIRST_DAY + dt.timedelta(days=draw(st.integers(0, 9)))
        if draw(st.booleans()):
            found.append(ScheduleException(day))
        else:
            start = draw(st.integers(0, 23 * 60)) // 5 * 5
            end = min(start + draw(st.integers(5, 180)) // 5 * 5, 23 * 60 + 59)
            found.append(ScheduleException(day, _time(start), _time(end)))
    return found


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[list[Schedule], dict[uuid.UUID, list[ScheduleException]], list, Query, float]:
    chosen = draw(st.lists(schedules(), min_size=0, max_size=4))
    excepted = {s.id: draw(exceptions(s)) for s in chosen}
    date_from = FIRST_DAY + dt.timedelta(days=draw(st.integers(0, 4)))
    date_to = date_from + dt.timedelta(days=draw(st.integers(0, 5)))
    mode = draw(st.sampled_from([None, "in_person", "video"]))
    doctor = draw(st.sampled_from([None, *DOCTORS]))
    now = dt.datetime.combine(FIRST_DAY, dt.time(), tzinfo=CLINIC_TZ) + dt.timedelta(
        minutes=draw(st.integers(-2 * 1440, 7 * 1440))
    )
    # Places taken: (doctor, start, end, a hold's expiry or None), epoch seconds, live at `now`.
    occupied = []
    for _ in range(draw(st.integers(0, 12))):
        start = dt.datetime.combine(FIRST_DAY, dt.time(), tzinfo=CLINIC_TZ) + dt.timedelta(
            minutes=draw(st.integers(0, 10 * 1440)) // 5 * 5
        )
        length = dt.timedelta(minutes=draw(st.sampled_from([10, 15, 30, 45])))
        expires = None
        if draw(st.booleans()):
            expires = (now + dt.timedelta(seconds=draw(st.integers(1, 3 * 86400)))).timestamp()
        occupied.append(
            (draw(st.sampled_from(DOCTORS)), start.timestamp(), (start + length).timestamp(), expires)
        )
    occupied.sort(key=lambda r: (r[0], r[1]))
    chosen = [s for s in chosen if doctor is None or s.doctor_id == doctor]
    return (
        chosen,
        excepted,
        occupied,
        Query(doctor, FACILITY, SERVICE, date_from, date_to, mode),
        now.timestamp(),
    )


def reference(
    chosen: list[Schedule],
    excepted: dict[uuid.UUID, list[ScheduleException]],
    occupied: list,
    query: Query,
    now_ts: float,
) -> bytes:
    """The free slots as the availability computed them before templates: plain and slow."""
    now = dt.datetime.fromtimestamp(now_ts, CLINIC_TZ)
    free: list[SlotOut] = []
    for schedule in chosen:
        if query.mode is not None and query.mode not in schedule.modes:
            continue
        last_day = min(query.date_to, last_open_day(schedule, now))
        for slot in slots(schedule, excepted.get(schedule.id, []), query.date_from, last_day):
            if slot.start <= now:
                continue
            used = sum(
                1
                for doctor, start, end, expires in occupied
                if doctor == schedule.doctor_id
                and start < slot.end.timestamp()
                and end > slot.start.timestamp()
                and (expires is None or expires > now_ts)
            )
            if schedule.capacity - used > 0:
                free.append(
                    SlotOut(
                        doctor_id=schedule.doctor_id,
                        service_id=schedule.service_id,
                        facility_id=schedule.facility_id,
                        start=slot.start,
                        end=slot.end,
                        modes=sorted(schedule.modes),  # type: ignore[arg-type]
                        remaining=schedule.capacity - used,
                    )
                )
    free.sort(key=lambda s: (s.start, str(s.doctor_id)))
    return msgspec.json.encode(Availability(slots=free))


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.floats(0, 1))
def test_the_template_answers_as_the_plain_computation_and_for_as_long_as_it_says(scenario, later):
    chosen, excepted, occupied, query, now = scenario
    template = Template(None, chosen, excepted, query)  # type: ignore[arg-type]
    free, valid_until = template.answer(occupied, now)
    assert body(free) == reference(chosen, excepted, occupied, query, now)
    assert valid_until > now
    # Any moment before `valid_until` gives the same answer (holds run out as time passes).
    if valid_until != float("inf"):
        moment = now + (valid_until - now) * later * 0.999
        still = [r for r in occupied if r[3] is None or r[3] > moment]
        assert reference(chosen, excepted, still, query, moment) == body(free)


@settings(max_examples=300, deadline=None)
@given(schedules(), st.data())
def test_find_slot_finds_exactly_the_listed_slot(schedule, data):
    excepted = data.draw(exceptions(schedule))
    day = FIRST_DAY + dt.timedelta(days=data.draw(st.integers(-1, 9)))
    listed = {s.start: s for s in slots(schedule, excepted, day, day)}
    for slot in listed.values():
        assert find_slot(schedule, excepted, slot.start.astimezone(dt.UTC)) == slot
    minute = dt.datetime.combine(day, dt.time(), tzinfo=CLINIC_TZ) + dt.timedelta(
        minutes=data.draw(st.integers(0, 1439))
    )
    assert find_slot(schedule, excepted, minute) == listed.get(minute)
