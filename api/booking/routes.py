"""Booking routes for citizens: availability, appointments (own and dependents'), the waitlist."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

import asyncpg
from litestar import Controller, MediaType, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from api.booking import booking, queries, waitlist
from api.booking.availability import AvailabilityCache, Query
from api.booking.models import (
    AppointmentCreate,
    AppointmentOut,
    AppointmentPage,
    Availability,
    CheckIn,
    Mode,
    Reschedule,
    WaitlistCreate,
    WaitlistOut,
)
from api.errors import BEARER, ApiError, error_responses
from api.idempotency import IdempotencyKey, idempotent
from api.identity.current_user import SESSION_CHECKED_BY_STATEMENT, SignedInRequest, TokenRequest
from api.pagination import Cursor, Limit, decode_cursor, next_cursor

APPOINTMENT_ERRORS = ("unauthorized", "not_found", "invalid_transition")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def appointment_in_care(
    db: asyncpg.Connection, request: SignedInRequest, appointment_id: uuid.UUID
) -> asyncpg.Record:
    """The appointment, locked, if the caller is its patient or their guardian, or works at its
    facility; otherwise 404, exactly as if it did not exist."""
    row = await queries.get_appointment_for(db, request.user.id, appointment_id, lock=True)
    if row is None:
        row = await queries.get_appointment(db, appointment_id, lock=True)
        if row is None or not request.user.is_at(row["facility_id"], "doctor", "facility_staff", "admin"):
            raise ApiError("not_found")
    return row


class AvailabilityController(Controller):
    path = "/v1/availability"
    tags = ["booking"]

    @get(
        operation_id="getAvailability",
        summary="Free slots of a doctor or a facility",
        description="Computed from schedules minus bookings and live holds; at most 31 days; clinic time.",
        responses=error_responses("invalid_date_range"),
    )
    async def availability(
        self,
        state: State,
        date_from: Annotated[dt.date, QueryParameter(name="date_from")],
        date_to: Annotated[dt.date, QueryParameter(name="date_to")],
        doctor_id: Annotated[uuid.UUID | None, QueryParameter(name="doctor_id")] = None,
        facility_id: Annotated[uuid.UUID | None, QueryParameter(name="facility_id")] = None,
        service_id: Annotated[uuid.UUID | None, QueryParameter(name="service_id")] = None,
        mode: Annotated[Mode | None, QueryParameter(name="mode")] = None,
    ) -> Response[Availability]:
        # The body comes encoded from the per-process cache (api/booking/availability.py), checked
        # against the database's versions first: never older than the request.
        cache: AvailabilityCache = state.availability
        body = await cache.answer(Query(doctor_id, facility_id, service_id, date_from, date_to, mode))
        return Response(body, media_type=MediaType.JSON)  # type: ignore[arg-type]


class AppointmentController(Controller):
    path = "/v1/appointments"
    security = [BEARER]
    tags = ["booking"]

    @post(
        operation_id="createAppointment",
        summary="Book a slot for yourself or a dependent",
        description=(
            "`Idempotency-Key` is required. A service without prepayment is `booked` at once; one with "
            "prepayment is `held` until `hold_expires_at` with a pending invoice."
        ),
        responses=error_responses(
            "unauthorized",
            "not_found",
            "slot_taken",
            "not_a_slot",
            "slot_not_open",
            "overlapping_appointment",
            "too_many_appointments",
            "rate_limited",
            "idempotency_key_required",
            "idempotency_key_reused",
        ),
        opt={SESSION_CHECKED_BY_STATEMENT: True},
    )
    async def create(
        self,
        request: TokenRequest,
        state: State,
        data: JSONBody[AppointmentCreate],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[AppointmentOut]:
        # No `db` here: the booking is one statement (booking.book), on a connection taken for it,
        # and that statement checks the session too.
        await state.rate_limiter.hit(
            "booking", str(request.user.id), limit=state.settings.booking_rate_per_minute
        )
        booked = await booking.book(
            state.db_pool,
            state.booking_schedules,
            state.settings,
            request.user,
            data,
            idempotency_key,
            utcnow(),
            state.outbox_waker,
        )
        return Response(
            booked.appointment,
            status_code=booked.status_code,
            headers={"Idempotent-Replayed": "true"} if booked.replayed else None,
        )

    @get(
        operation_id="listAppointments",
        summary="Your and your dependents' appointments",
        responses=error_responses("unauthorized", "invalid_cursor"),
    )
    async def list_appointments(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        which: Annotated[Literal["upcoming", "past"], QueryParameter(name="scope")] = "upcoming",
        limit: Limit = 20,
        cursor: Cursor = None,
    ) -> AppointmentPage:
        after = decode_cursor(cursor, dt.datetime, uuid.UUID) if cursor else None
        rows = await queries.list_appointments_for(
            db,
            request.user.id,
            upcoming=which == "upcoming",
            after=after,
            limit=limit + 1,
        )
        now = utcnow()
        return AppointmentPage(
            items=[booking.appointment_out(r, now) for r in rows[:limit]],
            next_cursor=next_cursor(rows, limit, "starts_at", "id"),
        )

    @get(
        "/{appointment_id:uuid}",
        operation_id="getAppointment",
        summary="One appointment",
        responses=error_responses("unauthorized", "not_found"),
    )
    async def get_appointment(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        appointment_id: FromPath[uuid.UUID],
    ) -> AppointmentOut:
        row = await queries.get_appointment_for(db, request.user.id, appointment_id)
        if row is None:
            raise ApiError("not_found")
        return booking.appointment_out(row, utcnow())

    @post(
        "/{appointment_id:uuid}/cancel",
        operation_id="cancelAppointment",
        summary="Cancel; frees the slot (up to the cut-off before the start)",
        status_code=200,
        responses=error_responses(*APPOINTMENT_ERRORS, "too_late_to_cancel"),
    )
    async def cancel(
        self,
        request: SignedInRequest,
        state: State,
        db: NamedDependency[asyncpg.Connection],
        appointment_id: FromPath[uuid.UUID],
    ) -> AppointmentOut:
        row = await queries.get_appointment_for(db, request.user.id, appointment_id, lock=True)
        if row is None:
            raise ApiError("not_found")
        now = utcnow()
        cancelled = await booking.cancel(db, state.settings, row, now)
        await waitlist.offer_freed_slot(db, state.settings, row, now)
        return cancelled

    @post(
        "/{appointment_id:uuid}/reschedule",
        operation_id="rescheduleAppointment",
        summary="Move to another slot of the same doctor and service; same id, same invoice",
        status_code=200,
        responses=error_responses(
            *APPOINTMENT_ERRORS,
            "too_late_to_cancel",
            "slot_taken",
            "not_a_slot",
            "slot_not_open",
            "overlapping_appointment",
        ),
    )
    async def reschedule(
        self,
        request: SignedInRequest,
        state: State,
        db: NamedDependency[asyncpg.Connection],
        appointment_id: FromPath[uuid.UUID],
        data: JSONBody[Reschedule],
    ) -> AppointmentOut:
        row = await queries.get_appointment_for(db, request.user.id, appointment_id, lock=True)
        if row is None:
            raise ApiError("not_found")
        now = utcnow()
        moved = await booking.reschedule(db, state.settings, row, data.start, now)
        await waitlist.offer_freed_slot(db, state.settings, row, now)
        return moved

    @post(
        "/{appointment_id:uuid}/check-in",
        operation_id="checkInAppointment",
        summary="Arrive at the facility (the patient, or staff scanning the chip ID card's QR)",
        status_code=200,
        responses=error_responses(*APPOINTMENT_ERRORS, "identity_mismatch", "not_check_in_time"),
    )
    async def check_in(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        appointment_id: FromPath[uuid.UUID],
        data: JSONBody[CheckIn],
    ) -> AppointmentOut:
        row = await appointment_in_care(db, request, appointment_id)
        return await booking.check_in(db, row, data.cccd_qr, utcnow())


class WaitlistController(Controller):
    path = "/v1/waitlist"
    security = [BEARER]
    tags = ["booking"]

    @post(
        operation_id="joinWaitlist",
        summary="Wait for a slot of a doctor or service in a date range",
        description="`Idempotency-Key` is required.",
        responses=error_responses(
            "unauthorized",
            "not_found",
            "invalid_date_range",
            "idempotency_key_required",
            "idempotency_key_reused",
        ),
    )
    async def join(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        data: JSONBody[WaitlistCreate],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[WaitlistOut]:
        async def create() -> tuple[int, WaitlistOut]:
            return 201, await waitlist.join(db, request.user.id, data, utcnow())

        return await idempotent(
            db, request.user.id, idempotency_key, "joinWaitlist", data, WaitlistOut, create
        )

    @get(
        operation_id="listWaitlist",
        summary="Your and your dependents' waitlist entries, with any offer",
        responses=error_responses("unauthorized"),
    )
    async def list_entries(
        self, request: SignedInRequest, db: NamedDependency[asyncpg.Connection]
    ) -> list[WaitlistOut]:
        now = utcnow()
        entries = []
        for row in await queries.waitlist_for(db, request.user.id):
            offer = None
            if row["status"] == "offered" and row["offer_appointment_id"]:
                offer = await queries.get_appointment(db, row["offer_appointment_id"])
            entries.append(waitlist.waitlist_out(row, offer, now))
        return entries

    @post(
        "/{entry_id:uuid}/accept",
        operation_id="acceptWaitlistOffer",
        summary="Take the slot offered to this entry",
        status_code=200,
        responses=error_responses("unauthorized", "not_found", "invalid_transition", "hold_expired"),
    )
    async def accept(
        self,
        request: SignedInRequest,
        state: State,
        db: NamedDependency[asyncpg.Connection],
        entry_id: FromPath[uuid.UUID],
    ) -> WaitlistOut:
        return await waitlist.accept(db, state.settings, request.user.id, entry_id, utcnow())

    @delete(
        "/{entry_id:uuid}",
        operation_id="leaveWaitlist",
        summary="Stop waiting; a slot held for this entry is released to the next one",
        responses=error_responses("unauthorized", "not_found"),
    )
    async def leave(
        self,
        request: SignedInRequest,
        state: State,
        db: NamedDependency[asyncpg.Connection],
        entry_id: FromPath[uuid.UUID],
    ) -> None:
        await waitlist.leave(db, state.settings, request.user.id, entry_id, utcnow())
