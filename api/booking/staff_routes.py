"""Booking routes for a facility's own staff: schedules and their exceptions, the day's list,
no-shows and completed visits."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from api.access import require_at
from api.booking import booking, queries
from api.booking.models import (
    AppointmentOut,
    ScheduleCreate,
    ScheduleExceptionCreate,
    ScheduleExceptionOut,
    ScheduleOut,
    WeeklyWindowIn,
)
from api.clinic_time import CLINIC_TZ
from api.errors import BEARER, ApiError, FieldError, error_responses
from api.identity.current_user import CurrentUser, SignedInRequest

STAFF_ERRORS = ("unauthorized", "forbidden", "not_found")
FacilityQuery = Annotated[
    uuid.UUID | None,
    QueryParameter(name="facility_id", description="Needed when you work at more than one facility."),
]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _hhmm(value: dt.time | None) -> str | None:
    return value.strftime("%H:%M") if value is not None else None


def schedule_out(row: asyncpg.Record) -> ScheduleOut:
    schedule = queries.schedule_of(row)
    return ScheduleOut(
        id=row["id"],
        facility_id=row["facility_id"],
        doctor_id=row["doctor_id"],
        service_id=row["service_id"],
        weekly=[
            WeeklyWindowIn(w.weekday, w.start.strftime("%H:%M"), w.end.strftime("%H:%M"))
            for w in schedule.weekly
        ],
        valid_from=row["valid_from"],
        valid_until=row["valid_until"],
        modes=sorted(row["modes"]),
        capacity=row["capacity"],
        buffer_minutes=row["buffer_minutes"],
        horizon_days=row["horizon_days"],
        release_time=row["release_time"].strftime("%H:%M"),
        slot_minutes=row["duration_minutes"],
        active=row["active"],
    )


def facility_of(user: CurrentUser, facility_id: uuid.UUID | None) -> uuid.UUID:
    """The facility a staff route acts on: the one asked for, or the caller's only one."""
    if facility_id is not None:
        return facility_id
    facilities = {m.facility_id for m in user.staff}
    if len(facilities) != 1:
        raise ApiError("validation_failed", errors=[FieldError(field="facility_id", message="required")])
    return facilities.pop()


async def staff_appointment(
    db: asyncpg.Connection, user: CurrentUser, appointment_id: uuid.UUID, *roles: str
) -> asyncpg.Record:
    row = await queries.get_appointment(db, appointment_id, lock=True)
    if row is None or not user.is_at(row["facility_id"], *roles):
        raise ApiError("not_found")
    return row


class StaffScheduleController(Controller):
    path = "/v1/staff/schedules"
    security = [BEARER]
    tags = ["staff"]

    @get(
        operation_id="listSchedules",
        summary="The facility's schedules",
        responses=error_responses(*STAFF_ERRORS),
    )
    async def list_schedules(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FacilityQuery = None,
    ) -> list[ScheduleOut]:
        facility = facility_of(request.user, facility_id)
        require_at(request.user, facility, "doctor", "facility_staff", "admin")
        return [schedule_out(r) for r in await queries.list_schedules(db, facility)]

    @post(
        operation_id="createSchedule",
        summary="Add a doctor's weekly schedule for a service",
        responses=error_responses(*STAFF_ERRORS),
    )
    async def create_schedule(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        data: JSONBody[ScheduleCreate],
    ) -> ScheduleOut:
        require_at(request.user, data.facility_id, "facility_staff", "admin")
        problems = [
            FieldError(field=f"weekly[{i}]", message="start must be before end")
            for i, w in enumerate(data.weekly)
            if w.start >= w.end
        ]
        if data.valid_until is not None and data.valid_until < data.valid_from:
            problems.append(FieldError(field="valid_until", message="must not be before valid_from"))
        if problems:
            raise ApiError("validation_failed", errors=problems)
        if not await queries.doctor_and_service_at(db, data.facility_id, data.doctor_id, data.service_id):
            raise ApiError("not_found")
        values = msgspec.structs.asdict(data)
        values["weekly"] = msgspec.json.encode(data.weekly).decode()
        values["modes"] = sorted(set(data.modes))
        values["release_time"] = dt.time.fromisoformat(data.release_time)
        return schedule_out(await queries.insert_schedule(db, values))

    @post(
        "/{schedule_id:uuid}/exceptions",
        operation_id="createScheduleException",
        summary="Take a day, or part of one, off a schedule (leave, a holiday)",
        description="Appointments already booked then are kept; staff move or cancel them.",
        responses=error_responses(*STAFF_ERRORS),
    )
    async def create_exception(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        schedule_id: FromPath[uuid.UUID],
        data: JSONBody[ScheduleExceptionCreate],
    ) -> ScheduleExceptionOut:
        schedule = await queries.get_schedule(db, schedule_id)
        if schedule is None or not request.user.is_at(schedule["facility_id"], "facility_staff", "admin"):
            raise ApiError("not_found")
        start = dt.time.fromisoformat(data.start) if data.start else None
        end = dt.time.fromisoformat(data.end) if data.end else None
        if (start is None) != (end is None) or (start is not None and end is not None and start >= end):
            raise ApiError(
                "validation_failed",
                errors=[FieldError(field="end", message="give both start < end, or neither")],
            )
        row = await queries.insert_exception(db, schedule_id, data.day, start, end, data.reason)
        return ScheduleExceptionOut(
            id=row["id"],
            schedule_id=row["schedule_id"],
            day=row["day"],
            start=_hhmm(row["start_time"]),
            end=_hhmm(row["end_time"]),
            reason=row["reason"],
        )


class StaffAppointmentController(Controller):
    path = "/v1/staff/appointments"
    security = [BEARER]
    tags = ["staff"]

    @get(
        operation_id="listFacilityAppointments",
        summary="The facility's appointments on one clinic day, in queue order",
        responses=error_responses(*STAFF_ERRORS),
    )
    async def day(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        date: Annotated[dt.date, QueryParameter(name="date")],
        facility_id: FacilityQuery = None,
    ) -> list[AppointmentOut]:
        facility = facility_of(request.user, facility_id)
        require_at(request.user, facility, "doctor", "facility_staff", "admin")
        start = dt.datetime.combine(date, dt.time(), tzinfo=CLINIC_TZ)
        rows = await queries.staff_day(db, facility, start, start + dt.timedelta(days=1))
        now = utcnow()
        return [booking.appointment_out(r, now) for r in rows]

    @post(
        "/{appointment_id:uuid}/no-show",
        operation_id="markNoShow",
        summary="The patient did not come",
        status_code=200,
        responses=error_responses(*STAFF_ERRORS, "invalid_transition"),
    )
    async def no_show(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        appointment_id: FromPath[uuid.UUID],
    ) -> AppointmentOut:
        row = await staff_appointment(db, request.user, appointment_id, "facility_staff", "admin")
        now = utcnow()
        if row["starts_at"] > now:
            raise ApiError("invalid_transition")  # nobody is a no-show before the visit begins
        return await booking.move_to(db, row, "no_show", now)

    @post(
        "/{appointment_id:uuid}/complete",
        operation_id="completeAppointment",
        summary="The visit took place",
        status_code=200,
        responses=error_responses(*STAFF_ERRORS, "invalid_transition"),
    )
    async def complete(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        appointment_id: FromPath[uuid.UUID],
    ) -> AppointmentOut:
        row = await staff_appointment(db, request.user, appointment_id, "doctor", "facility_staff", "admin")
        return await booking.move_to(db, row, "completed", utcnow())
