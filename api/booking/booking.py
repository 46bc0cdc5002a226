"""Booking, cancelling, moving and checking in appointments: the rules, in one place.

Every function runs inside the caller's transaction (the request's), so a failure part-way
leaves nothing behind. Double booking is impossible by construction: the exclusion constraint
on `appointments` decides who gets a place, and losers get 409 `slot_taken`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import NamedTuple

import asyncpg
import msgspec

import notifications
from api.booking import queries, states
from api.booking.models import AppointmentCreate, AppointmentOut
from api.booking.schedule_cache import ScheduleCache
from api.booking.slots import Schedule, Slot, find_slot, is_open
from api.clinic_time import clinic_time
from api.db import FairPool
from api.errors import ApiError
from api.idempotency import request_digest
from api.identity.cccd import matches, parse_cccd_qr
from api.identity.current_user import SessionToken
from api.identity.queries import session_is_live
from api.payments.refunds import refund_invoice
from api.settings import Settings
from notifications.outbox import Waker
from notifications.templates import check_params

_ENCODE = msgspec.json.Encoder()

# Check-in opens an hour before the visit and closes when its slot ends: earlier, a patient
# could check in days ahead and could then never be marked a no-show.
CHECK_IN_OPENS = dt.timedelta(hours=1)
ONCE_PER_APPOINTMENT = frozenset({"appointment_booked", "appointment_cancelled", "appointment_hold_expiring"})
# Written when due (api/booking/reminders.py); those not pushed yet are withdrawn when the visit moves.
REMINDER_KINDS = ("appointment_reminder_24h", "appointment_reminder_15m")


def appointment_out(row: asyncpg.Record, now: dt.datetime) -> AppointmentOut:
    status = row["status"]
    if status == "held" and row["hold_expires_at"] <= now:
        status = "expired"  # the housekeeping job has not got to it yet; the hold is over all the same
    return AppointmentOut(
        id=row["id"],
        status=status,
        patient_id=row["patient_id"],
        facility_id=row["facility_id"],
        doctor_id=row["doctor_id"],
        service_id=row["service_id"],
        start=clinic_time(row["starts_at"]),
        end=clinic_time(row["ends_at"]),
        mode=row["mode"],
        hold_expires_at=clinic_time(row["hold_expires_at"]) if row["hold_expires_at"] else None,
        invoice_id=row["invoice_id"],
        queue_number=row["queue_number"],
        reason=row["reason"],
    )


async def find_bookable(
    conn: asyncpg.Connection,
    doctor_id: uuid.UUID,
    service_id: uuid.UUID,
    mode: str,
    start: dt.datetime,
    now: dt.datetime,
) -> tuple[Schedule, Slot]:
    """The schedule and slot a booking asks for: 422 `not_a_slot` or `slot_not_open` otherwise."""
    if start.tzinfo is None:
        raise ApiError("not_a_slot")
    day = clinic_time(start).date()
    schedules, exceptions = await queries.bookable_schedules(
        conn, doctor_id=doctor_id, facility_id=None, service_id=service_id, date_from=day, date_to=day
    )
    for schedule in schedules:
        if mode not in schedule.modes:
            continue
        slot = find_slot(schedule, exceptions.get(schedule.id, []), start)
        if slot is not None:
            if not is_open(schedule, slot, now):
                raise ApiError("slot_not_open")
            return schedule, slot
    raise ApiError("not_a_slot")


async def take_place(
    conn: asyncpg.Connection, schedule: Schedule, slot: Slot, patient_id: uuid.UUID, values: dict[str, object]
) -> asyncpg.Record:
    """Insert the appointment in the first free place of the slot; 409 `slot_taken` when none is.

    Under the doctor's day lock; a hold that ran out but is still marked `held` is expired first,
    so it never blocks anyone; booked in person, it gets the day's next queue number.
    """
    try:
        row = await queries.take_place(conn, values, schedule.capacity)
    except asyncpg.RaiseError as error:
        if error.args and error.args[0] == "slot_taken":
            raise ApiError("slot_taken") from None
        raise
    if row is None:
        raise ApiError("slot_taken")
    return row


async def check_patient_limits(
    conn: asyncpg.Connection,
    settings: Settings,
    patient_id: uuid.UUID,
    facility_id: uuid.UUID,
    slot: Slot,
    moving: uuid.UUID | None = None,
) -> None:
    """One patient, one place at a time, and a bounded number of upcoming visits per facility.

    The patient's bookings are locked first, so two of them cannot both pass the count.
    """
    refusal = await queries.patient_refusal(
        conn, patient_id, facility_id, slot.start, slot.end, settings.booking_max_per_facility, moving
    )
    if refusal is not None:
        raise ApiError(refusal)


class Booked(NamedTuple):
    status_code: int
    appointment: AppointmentOut
    replayed: bool
    """The answer kept for the Idempotency-Key, given again."""


ROUTE = "createAppointment"


async def book(
    pool: FairPool,
    schedule_cache: ScheduleCache,
    settings: Settings,
    caller: SessionToken,
    data: AppointmentCreate,
    key: str | None,
    now: dt.datetime,
    waker: Waker,
) -> Booked:
    """POST /v1/appointments: one statement, `book_appointment` (migrations 0006 and 0008), outside
    any transaction, so one round trip (the caller's session is checked there too) and no lock
    held while Python runs.

    The slot is found in this process's copy of the doctor's schedules; the statement refuses
    with `stale` if they changed since, and they are read again. Everything else is decided
    there, in the order the rules are listed in book_appointment; nothing is written unless the
    appointment is made. Its notification wakes the workers through `waker` once committed, not
    by a NOTIFY, which would serialise the commits of all bookings (migration 0011).
    """
    if not key:
        raise ApiError("idempotency_key_required")
    user_id = caller.id
    digest = request_digest(ROUTE, data)
    patient_id = data.patient_id or user_id
    fresh = False
    for _ in range(5):
        schedules = await schedule_cache.get(data.doctor_id, data.service_id, fresh=fresh)
        found = schedules.find(data.mode, data.start, now)
        if isinstance(found, str):
            if not fresh:
                fresh = True  # maybe a schedule added a moment ago: check with the database
                continue
            return await _refused(pool, caller, patient_id, key, digest, found)
        schedule, slot = found
        held = schedules.prepaid
        appointment = AppointmentOut(
            id=uuid.uuid4(),
            status="held" if held else "booked",
            patient_id=patient_id,
            facility_id=schedule.facility_id,
            doctor_id=schedule.doctor_id,
            service_id=schedule.service_id,
            start=slot.start,
            end=slot.end,
            mode=data.mode,
            hold_expires_at=clinic_time(now + dt.timedelta(minutes=settings.booking_hold_minutes))
            if held
            else None,
            invoice_id=uuid.uuid4() if held else None,
            reason=data.reason,
        )
        notes = _notes_for_new(appointment, user_id)
        async with pool.acquire() as conn:
            try:
                row = await queries.book_appointment(
                    conn,
                    caller.session_id,
                    caller.issued_at,
                    user_id,
                    key,
                    ROUTE,
                    digest,
                    _ENCODE.encode(appointment).decode(),
                    appointment.id,
                    patient_id,
                    schedule.facility_id,
                    schedule.doctor_id,
                    schedule.service_id,
                    schedule.id,
                    slot.start,
                    slot.end,
                    data.mode,
                    schedule.capacity,
                    held,
                    appointment.hold_expires_at,
                    appointment.invoice_id,
                    data.reason,
                    schedules.version,
                    settings.booking_max_per_facility,
                    [n[0] for n in notes],
                    [n[1] for n in notes],
                    [n[2] for n in notes],
                    [n[3] for n in notes],
                    [n[4] for n in notes],
                )
            except asyncpg.RaiseError as error:
                if error.args and error.args[0] == "slot_taken":
                    raise ApiError("slot_taken") from None
                raise
        outcome = row["outcome"]
        if outcome == "booked":
            waker.wake()
            appointment.queue_number = row["number"]
            return Booked(201, appointment, replayed=False)
        if outcome == "replay":
            replay = msgspec.json.decode(row["replay_body"], type=AppointmentOut)
            return Booked(row["replay_status"], replay, replayed=True)
        if outcome != "stale":
            raise ApiError(outcome)
        fresh = True
    raise RuntimeError("the doctor's schedules kept changing while booking")


async def _refused(
    pool: FairPool, caller: SessionToken, patient_id: uuid.UUID, key: str, digest: bytes, refusal: str
) -> Booked:
    """The slot asked for is not one (or not open): as before any other check, the session is
    checked, a key used before is answered, then someone else's patient is not found."""
    user_id = caller.id
    async with pool.acquire() as conn:
        if not await session_is_live(conn, user_id, caller.session_id, caller.issued_at):
            raise ApiError("invalid_token")
        seen = await queries.idempotency_record(conn, user_id, key)
        if seen is not None:
            if bytes(seen["request_hash"]) != digest:
                raise ApiError("idempotency_key_reused")
            replay = msgspec.json.decode(seen["response"], type=AppointmentOut)
            return Booked(seen["status_code"], replay, replayed=True)
        if not await queries.cares_for(conn, user_id, patient_id):
            raise ApiError("not_found")
    raise ApiError(refusal)


def _notes_for_new(
    appointment: AppointmentOut, booked_by: uuid.UUID
) -> list[tuple[uuid.UUID, str, str, str | None, dt.datetime | None]]:
    """The notifications `confirm` (booked) or `book` (held) enqueue for a new appointment, as
    (user, kind, params, dedupe key, not before): book_appointment inserts them. Reminders are
    not among them: they are written when due (api/booking/reminders.py)."""
    notes: list[tuple[uuid.UUID, str, str, str | None, dt.datetime | None]] = []
    start = appointment.start.astimezone(dt.UTC)  # as the row reads back from PostgreSQL

    def add(kind: str, params: dict[str, object], not_before: dt.datetime | None = None) -> None:
        encoded = _ENCODE.encode(check_params(kind, params)).decode()
        for recipient in dict.fromkeys((booked_by, appointment.patient_id)):
            dedupe = (
                f"{_subject(appointment.id)}:{kind}:{recipient}" if kind in ONCE_PER_APPOINTMENT else None
            )
            notes.append((recipient, kind, encoded, dedupe, not_before))

    if appointment.status == "held":
        assert appointment.hold_expires_at is not None
        expires = appointment.hold_expires_at.astimezone(dt.UTC)
        add(
            "appointment_hold_expiring",
            {"appointment_id": appointment.id, "expires_at": expires},
            not_before=expires - dt.timedelta(minutes=3),
        )
    else:
        add("appointment_booked", {"appointment_id": appointment.id, "start": start})
    return notes


async def confirm(conn: asyncpg.Connection, row: asyncpg.Record) -> asyncpg.Record:
    """A booked appointment gets its queue number (in person) and its confirmation (its reminders
    are planned by the status change, migration 0010).

    Used by payments when a hold is paid, by the waitlist when an offer is accepted, and when a
    late payment takes its slot again (`retake`; `take_place` has numbered that one already).
    """
    if row["status"] != "booked":
        moved = await queries.set_status(conn, row["id"], "booked", states.sources("booked"))
        if moved is None:
            raise ApiError("invalid_transition")
        row = moved
        await notifications.cancel_pending(conn, _subject(row["id"]), ["appointment_hold_expiring"])
    if row["mode"] == "in_person" and row["queue_number"] is None:
        await queries.give_queue_number(
            conn, row["id"], row["doctor_id"], clinic_time(row["starts_at"]).date()
        )
        numbered = await queries.get_appointment(conn, row["id"])
        assert numbered is not None
        row = numbered
    await tell(conn, row, "appointment_booked")
    return row


async def cancel(
    conn: asyncpg.Connection,
    settings: Settings,
    row: asyncpg.Record,
    now: dt.datetime,
    *,
    by_staff: bool = False,
) -> AppointmentOut:
    """Cancel and free the slot, up to the cut-off before the start (staff may cancel any time)."""
    status = appointment_out(row, now).status
    if not states.can_move(status, "cancelled"):
        raise ApiError("invalid_transition")
    if not by_staff and row["starts_at"] - now < dt.timedelta(minutes=settings.booking_cancel_cutoff_minutes):
        raise ApiError("too_late_to_cancel")
    cancelled = await queries.set_status(
        conn, row["id"], "cancelled", states.sources("cancelled"), cancelled_at=True
    )
    if cancelled is None:
        raise ApiError("invalid_transition")
    if row["invoice_id"] is not None:
        # A pending invoice is void; a paid one is refunded (cancelled within policy).
        await queries.void_invoice(conn, row["invoice_id"])
        await refund_invoice(conn, row["invoice_id"], None, "appointment cancelled")
    await queries.end_offer(conn, row["id"])
    await notifications.cancel_pending(conn, _subject(row["id"]))
    await tell(conn, cancelled, "appointment_cancelled")
    return appointment_out(cancelled, now)


async def reschedule(
    conn: asyncpg.Connection, settings: Settings, row: asyncpg.Record, start: dt.datetime, now: dt.datetime
) -> AppointmentOut:
    """Move the same appointment to another slot of the same doctor and service, atomically.

    The new place is taken and the old one freed by one UPDATE: if the new slot is taken the
    exclusion constraint refuses it and nothing changes. Invoice and payment stay attached.
    """
    if appointment_out(row, now).status not in ("booked", "held"):
        raise ApiError("invalid_transition")
    if row["starts_at"] - now < dt.timedelta(minutes=settings.booking_cancel_cutoff_minutes):
        raise ApiError("too_late_to_cancel")
    schedule, slot = await find_bookable(conn, row["doctor_id"], row["service_id"], row["mode"], start, now)
    await check_patient_limits(
        conn, settings, row["patient_id"], schedule.facility_id, slot, moving=row["id"]
    )
    await queries.lock_doctor_days(
        conn, schedule.doctor_id, [clinic_time(row["starts_at"]).date(), clinic_time(slot.start).date()]
    )
    await queries.expire_holds(
        conn, doctor_id=schedule.doctor_id, patient_id=row["patient_id"], start=slot.start, end=slot.end
    )
    moved = None
    for seat in range(1, schedule.capacity + 1):
        try:
            async with conn.transaction():  # a savepoint: a taken place undoes only this try
                moved = await queries.move_appointment(
                    conn, row["id"], schedule.id, slot.start, slot.end, seat
                )
            break
        except asyncpg.ExclusionViolationError:
            continue
    if moved is None:
        raise ApiError("slot_taken")
    if moved["status"] == "booked":
        if moved["mode"] == "in_person":
            await queries.give_queue_number(
                conn, moved["id"], moved["doctor_id"], clinic_time(slot.start).date()
            )
            moved = await queries.get_appointment(conn, moved["id"])
            assert moved is not None
        # Reminders already written for the old time go; the new time's come when due.
        await notifications.cancel_pending(conn, _subject(row["id"]), list(REMINDER_KINDS))
        await tell(conn, moved, "appointment_rescheduled")
    return appointment_out(moved, now)


async def check_in(
    conn: asyncpg.Connection, row: asyncpg.Record, cccd_qr: str | None, now: dt.datetime
) -> AppointmentOut:
    """Arrival at the facility. A scanned chip ID card must be the patient's (422 `identity_mismatch`)."""
    if appointment_out(row, now).status != "booked":
        raise ApiError("invalid_transition")
    if not row["starts_at"] - CHECK_IN_OPENS <= now <= row["ends_at"]:
        raise ApiError("not_check_in_time")
    if cccd_qr is not None:
        card = parse_cccd_qr(cccd_qr)
        patient = await queries.person(conn, row["patient_id"])
        assert patient is not None
        if card is None or not matches(
            card, patient["personal_id"], patient["full_name"], patient["birthdate"]
        ):
            raise ApiError("identity_mismatch")
    done = await queries.set_status(
        conn, row["id"], "checked_in", states.sources("checked_in"), checked_in_at=True
    )
    if done is None:
        raise ApiError("invalid_transition")
    await notifications.cancel_pending(conn, _subject(row["id"]), list(REMINDER_KINDS))
    return appointment_out(done, now)


async def move_to(
    conn: asyncpg.Connection, row: asyncpg.Record, target: str, now: dt.datetime
) -> AppointmentOut:
    """A staff transition (no-show, completed), checked against the state machine."""
    if not states.can_move(appointment_out(row, now).status, target):
        raise ApiError("invalid_transition")
    moved = await queries.set_status(conn, row["id"], target, states.sources(target))
    if moved is None:
        raise ApiError("invalid_transition")
    return appointment_out(moved, now)


def _subject(appointment_id: uuid.UUID) -> str:
    return f"appointment:{appointment_id}"


async def tell(conn: asyncpg.Connection, row: asyncpg.Record, kind: str) -> None:
    """Notify whoever booked (a guardian for a child) and the patient, if they are someone else,
    about the visit at its start time."""
    params = {"appointment_id": row["id"], "start": row["starts_at"]}
    for recipient in dict.fromkeys((row["booked_by"], row["patient_id"])):
        await notifications.enqueue(
            conn,
            recipient,
            kind,
            params,
            # Booked, cancelled and hold-expiring happen once per appointment; reminders and
            # "moved" come again with every move, so they carry no key.
            dedupe_key=f"{_subject(row['id'])}:{kind}:{recipient}" if kind in ONCE_PER_APPOINTMENT else None,
            facility_id=row["facility_id"],
            subject=_subject(row["id"]),
        )


async def retake(
    conn: asyncpg.Connection, settings: Settings, row: asyncpg.Record, now: dt.datetime
) -> asyncpg.Record | None:
    """A payment arrived after its hold ran out: book the same slot again if it is still free.

    The new appointment takes over the invoice. None when the slot is gone (or the patient
    cannot take it any more): the caller refunds.
    """
    try:
        async with conn.transaction():  # a savepoint: a slot that is gone changes nothing
            schedule, slot = await find_bookable(
                conn, row["doctor_id"], row["service_id"], row["mode"], row["starts_at"], now
            )
            await check_patient_limits(conn, settings, row["patient_id"], schedule.facility_id, slot)
            await queries.detach_invoice(conn, row["id"])
            taken = await take_place(
                conn,
                schedule,
                slot,
                row["patient_id"],
                {
                    "patient_id": row["patient_id"],
                    "booked_by": row["booked_by"],
                    "facility_id": schedule.facility_id,
                    "doctor_id": schedule.doctor_id,
                    "service_id": schedule.service_id,
                    "schedule_id": schedule.id,
                    "starts_at": slot.start,
                    "ends_at": slot.end,
                    "mode": row["mode"],
                    "status": "booked",
                    "hold_expires_at": None,
                    "invoice_id": row["invoice_id"],
                    "reason": row["reason"],
                },
            )
            return await confirm(conn, taken)
    except ApiError:
        return None
