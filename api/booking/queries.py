"""All SQL of booking: schedules, occupancy, appointments, invoices, queue numbers, waitlist."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

from api.booking.slots import Schedule, ScheduleException, WeeklyWindow

APPOINTMENT = (
    "a.id, a.status, a.patient_id, a.booked_by, a.facility_id, a.doctor_id, a.service_id, a.schedule_id, "
    "a.starts_at, a.ends_at, a.mode, a.hold_expires_at, a.invoice_id, a.queue_number, a.reason"
)
# The patient themselves or their guardian: who may see and act on an appointment.
CARES_FOR = (
    "(a.patient_id = $1 OR EXISTS (SELECT 1 FROM guardianships g "
    "WHERE g.guardian_id = $1 AND g.dependent_id = a.patient_id))"
)
_SCHEDULE = (
    "s.id, s.facility_id, s.doctor_id, s.service_id, s.weekly, s.capacity, s.buffer_minutes, s.modes, "
    "s.horizon_days, s.release_time, s.valid_from, s.valid_until, s.active, sv.duration_minutes"
)


def schedule_of(row: asyncpg.Record) -> Schedule:
    return Schedule(
        id=row["id"],
        facility_id=row["facility_id"],
        doctor_id=row["doctor_id"],
        service_id=row["service_id"],
        weekly=tuple(
            WeeklyWindow(w["weekday"], dt.time.fromisoformat(w["start"]), dt.time.fromisoformat(w["end"]))
            for w in msgspec.json.decode(row["weekly"])
        ),
        duration_minutes=row["duration_minutes"],
        capacity=row["capacity"],
        buffer_minutes=row["buffer_minutes"],
        modes=frozenset(row["modes"]),
        horizon_days=row["horizon_days"],
        release_time=row["release_time"],
        valid_from=row["valid_from"],
        valid_until=row["valid_until"],
    )


# ------------------------------------------------------------------ schedules


async def doctor_and_service_at(
    conn: asyncpg.Connection,
    facility_id: uuid.UUID,
    doctor_id: uuid.UUID | None,
    service_id: uuid.UUID | None,
) -> bool:
    """Both belong to the facility (a missing one is not checked)."""
    return bool(
        await conn.fetchval(
            """SELECT ($2::uuid IS NULL OR EXISTS (SELECT 1 FROM doctors WHERE id = $2 AND facility_id = $1))
                  AND ($3::uuid IS NULL OR EXISTS (SELECT 1 FROM services WHERE id = $3 AND facility_id = $1))""",
            facility_id,
            doctor_id,
            service_id,
        )
    )


async def ensure_schedule(
    conn: asyncpg.Connection,
    facility_id: uuid.UUID,
    doctor_code: str,
    service_code: str,
    weekly: list[dict[str, Any]],
    modes: list[str],
    capacity: int,
) -> None:
    """A (demo) schedule by codes, unless that doctor already has one for that service (seeding is idempotent)."""
    await conn.execute(
        """INSERT INTO schedules (facility_id, doctor_id, service_id, weekly, modes, capacity, valid_from)
           SELECT $1, d.id, s.id, $4::jsonb, $5, $6, (now() AT TIME ZONE 'Asia/Ho_Chi_Minh')::date
             FROM doctors d JOIN services s ON s.facility_id = d.facility_id
            WHERE d.facility_id = $1 AND d.code = $2 AND s.code = $3
              AND NOT EXISTS (SELECT 1 FROM schedules x WHERE x.doctor_id = d.id AND x.service_id = s.id)""",
        facility_id,
        doctor_code,
        service_code,
        json.dumps(weekly),
        modes,
        capacity,
    )


async def insert_schedule(conn: asyncpg.Connection, values: dict[str, Any]) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""WITH s AS (
                INSERT INTO schedules (facility_id, doctor_id, service_id, weekly, capacity, buffer_minutes,
                                       modes, horizon_days, release_time, valid_from, valid_until)
                VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10, $11) RETURNING *)
            SELECT {_SCHEDULE} FROM s JOIN services sv ON sv.id = s.service_id""",
        values["facility_id"],
        values["doctor_id"],
        values["service_id"],
        values["weekly"],
        values["capacity"],
        values["buffer_minutes"],
        values["modes"],
        values["horizon_days"],
        values["release_time"],
        values["valid_from"],
        values["valid_until"],
    )
    assert row is not None
    return row


async def list_schedules(conn: asyncpg.Connection, facility_id: uuid.UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_SCHEDULE} FROM schedules s JOIN services sv ON sv.id = s.service_id
             WHERE s.facility_id = $1 ORDER BY s.created_at, s.id""",
        facility_id,
    )
    return rows


async def get_schedule(conn: asyncpg.Connection, schedule_id: uuid.UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_SCHEDULE} FROM schedules s JOIN services sv ON sv.id = s.service_id WHERE s.id = $1",
        schedule_id,
    )
    return row


async def insert_exception(
    conn: asyncpg.Connection,
    schedule_id: uuid.UUID,
    day: dt.date,
    start: dt.time | None,
    end: dt.time | None,
    reason: str,
) -> asyncpg.Record:
    row = await conn.fetchrow(
        """INSERT INTO schedule_exceptions (schedule_id, day, start_time, end_time, reason)
           VALUES ($1, $2, $3, $4, $5) RETURNING id, schedule_id, day, start_time, end_time, reason""",
        schedule_id,
        day,
        start,
        end,
        reason,
    )
    assert row is not None
    return row


async def bookable_schedules(
    conn: asyncpg.Connection,
    *,
    doctor_id: uuid.UUID | None,
    facility_id: uuid.UUID | None,
    service_id: uuid.UUID | None,
    date_from: dt.date,
    date_to: dt.date,
) -> tuple[list[Schedule], dict[uuid.UUID, list[ScheduleException]]]:
    """Active schedules of a doctor or a facility (optionally one service) running in the range,
    with their exceptions in it."""
    rows = await conn.fetch(
        f"""SELECT {_SCHEDULE} FROM schedules s
              JOIN services sv ON sv.id = s.service_id AND sv.active
              JOIN doctors d ON d.id = s.doctor_id AND d.active
             WHERE s.active
               AND ($1::uuid IS NULL OR s.doctor_id = $1)
               AND ($2::uuid IS NULL OR s.facility_id = $2)
               AND ($3::uuid IS NULL OR s.service_id = $3)
               AND s.valid_from <= $5 AND (s.valid_until IS NULL OR s.valid_until >= $4)
             ORDER BY s.created_at, s.id""",
        doctor_id,
        facility_id,
        service_id,
        date_from,
        date_to,
    )
    schedules = [schedule_of(r) for r in rows]
    exceptions: dict[uuid.UUID, list[ScheduleException]] = {}
    if schedules:
        for r in await conn.fetch(
            """SELECT schedule_id, day, start_time, end_time FROM schedule_exceptions
                WHERE schedule_id = ANY($1) AND day BETWEEN $2 AND $3""",
            [s.id for s in schedules],
            date_from,
            date_to,
        ):
            exceptions.setdefault(r["schedule_id"], []).append(
                ScheduleException(r["day"], r["start_time"], r["end_time"])
            )
    return schedules, exceptions


async def occupancy_epochs(
    conn: asyncpg.Connection, doctor_ids: Sequence[uuid.UUID], start: dt.datetime, end: dt.datetime
) -> list[asyncpg.Record]:
    """Appointments that hold a place of these doctors in [start, end) (a hold counts until it
    expires), for the availability: (doctor_id, start, end, a hold's expiry) in epoch seconds."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT doctor_id, date_part('epoch', starts_at), date_part('epoch', ends_at),
                  CASE WHEN status = 'held' THEN date_part('epoch', hold_expires_at) END
             FROM appointments
            WHERE doctor_id = ANY($1) AND tstzrange(starts_at, ends_at) && tstzrange($2, $3)
              AND status IN ('held', 'booked', 'checked_in', 'completed')
              AND (status <> 'held' OR hold_expires_at > now())
            ORDER BY doctor_id, starts_at""",
        list(doctor_ids),
        start,
        end,
    )
    return rows


# ------------------------------------------------------------------ booking


async def cares_for(conn: asyncpg.Connection, user_id: uuid.UUID, patient_id: uuid.UUID) -> bool:
    """The user is the patient, or the patient's guardian."""
    if user_id == patient_id:
        return True
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM guardianships WHERE guardian_id = $1 AND dependent_id = $2", user_id, patient_id
        )
    )


async def patient_refusal(
    conn: asyncpg.Connection,
    patient_id: uuid.UUID,
    facility_id: uuid.UUID,
    start: dt.datetime,
    end: dt.datetime,
    max_per_facility: int,
    moving: uuid.UUID | None = None,
) -> str | None:
    """Locks the patient's bookings until the transaction ends, then: None, or
    `overlapping_appointment` / `too_many_appointments` (booking_patient_refusal, migration 0006)."""
    refusal: str | None = await conn.fetchval(
        "SELECT booking_patient_refusal($1, $2, $3, $4, $5, $6)",
        patient_id,
        facility_id,
        start,
        end,
        moving,
        max_per_facility,
    )
    return refusal


async def expire_holds(
    conn: asyncpg.Connection,
    *,
    doctor_id: uuid.UUID | None = None,
    patient_id: uuid.UUID | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    limit: int = 500,
) -> list[asyncpg.Record]:
    """Holds past their time become `expired`, their pending invoices `void` and the waitlist
    offers they were `lapsed`; the expired rows.

    Called for a slot just before booking it (so a stale hold never blocks a patient) and by the
    housekeeping job for all of them. SKIP LOCKED: a hold being paid right now is left to its payer.
    """
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {APPOINTMENT} FROM booking_expire_holds($1, $2, $3, $4, $5) a",
        doctor_id,
        patient_id,
        start,
        end,
        limit,
    )
    return rows


async def lock_doctor_days(conn: asyncpg.Connection, doctor_id: uuid.UUID, days: Sequence[dt.date]) -> None:
    """Serialise changes to one doctor's slots on these clinic days until the transaction ends.

    The exclusion constraint alone keeps bookings apart, but a move (an UPDATE) racing a
    booking or another move into the same time can deadlock on it, and the loser would get
    a 500 after a second. Taking these locks in date order first makes them wait in line.
    """
    for day in sorted(set(days)):
        await conn.execute("SELECT booking_lock_day($1, $2)", doctor_id, day)


async def end_offer(conn: asyncpg.Connection, appointment_id: uuid.UUID) -> None:
    """The held appointment of a waitlist offer is gone (cancelled): the offer lapses."""
    await conn.execute(
        """UPDATE waitlist_entries SET status = 'lapsed', updated_at = now()
            WHERE offer_appointment_id = $1 AND status = 'offered'""",
        appointment_id,
    )


async def insert_invoice(
    conn: asyncpg.Connection, patient_id: uuid.UUID, facility_id: uuid.UUID, service_id: uuid.UUID
) -> uuid.UUID:
    """A pending invoice for the service at its current price (never a price from the client)."""
    invoice_id: uuid.UUID = await conn.fetchval(
        """INSERT INTO invoices (patient_id, facility_id, service_id, amount_vnd)
           SELECT $1, $2, id, price_vnd FROM services WHERE id = $3 RETURNING id""",
        patient_id,
        facility_id,
        service_id,
    )
    return invoice_id


async def service_terms(conn: asyncpg.Connection, service_id: uuid.UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT prepayment_required, price_vnd FROM services WHERE id = $1", service_id
    )
    return row


async def take_place(
    conn: asyncpg.Connection, values: dict[str, Any], capacity: int
) -> asyncpg.Record | None:
    """The new appointment in the first free place of its slot (booking_take_place, migration
    0006), numbered in the doctor's day queue when booked in person; None when every place is
    held. Raises asyncpg.RaiseError `slot_taken` when that is found out only after writing."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {APPOINTMENT}
              FROM booking_take_place($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) a""",
        values.get("id"),
        values["patient_id"],
        values["booked_by"],
        values["facility_id"],
        values["doctor_id"],
        values["service_id"],
        values["schedule_id"],
        values["starts_at"],
        values["ends_at"],
        values["mode"],
        values["status"],
        values["hold_expires_at"],
        values["invoice_id"],
        values["reason"],
        capacity,
    )
    return row if row is not None and row["id"] is not None else None


async def book_appointment(conn: asyncpg.Connection, *args: Any) -> asyncpg.Record:
    """book_appointment (migration 0008): a whole POST /v1/appointments in one statement."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT outcome, replay_status, replay_body, number
             FROM book_appointment($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                                   $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28)""",
        *args,
    )
    assert row is not None
    return row


async def idempotency_record(conn: asyncpg.Connection, user_id: uuid.UUID, key: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT request_hash, status_code, response FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        user_id,
        key,
    )
    return row


async def doctor_schedules(
    conn: asyncpg.Connection, doctor_id: uuid.UUID, service_id: uuid.UUID, from_day: dt.date
) -> tuple[int, bool, list[Schedule], dict[uuid.UUID, list[ScheduleException]]]:
    """The doctor's schedules version and whether the service is prepaid, then the doctor's active
    schedules for the service (with their exceptions from `from_day` on), read after them."""
    row = await conn.fetchrow(
        """SELECT coalesce((SELECT version FROM slot_versions WHERE doctor_id = $1 AND day = '-infinity'), 0),
                  coalesce((SELECT prepayment_required FROM services WHERE id = $2), false)""",
        doctor_id,
        service_id,
    )
    assert row is not None
    schedules, exceptions = await bookable_schedules(
        conn,
        doctor_id=doctor_id,
        facility_id=None,
        service_id=service_id,
        date_from=from_day,
        date_to=dt.date.max,
    )
    return row[0], row[1], schedules, exceptions


async def give_queue_number(
    conn: asyncpg.Connection, appointment_id: uuid.UUID, doctor_id: uuid.UUID, day: dt.date
) -> int:
    """The doctor's next number that day. The counter row is locked until this transaction ends
    and rolls back with it, so numbers are unique and leave no gaps."""
    number: int = await conn.fetchval(
        """INSERT INTO queue_counters (doctor_id, day, last_number) VALUES ($1, $2, 1)
           ON CONFLICT (doctor_id, day) DO UPDATE SET last_number = queue_counters.last_number + 1
           RETURNING last_number""",
        doctor_id,
        day,
    )
    await conn.execute(
        "UPDATE appointments SET queue_day = $2, queue_number = $3 WHERE id = $1", appointment_id, day, number
    )
    return number


async def get_appointment_for(
    conn: asyncpg.Connection, user_id: uuid.UUID, appointment_id: uuid.UUID, *, lock: bool = False
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {APPOINTMENT} FROM appointments a WHERE a.id = $2 AND {CARES_FOR}"
        + (" FOR UPDATE OF a" if lock else ""),
        user_id,
        appointment_id,
    )
    return row


async def get_appointment(
    conn: asyncpg.Connection, appointment_id: uuid.UUID, *, lock: bool = False
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {APPOINTMENT} FROM appointments a WHERE a.id = $1" + (" FOR UPDATE" if lock else ""),
        appointment_id,
    )
    return row


async def appointment_of_invoice(
    conn: asyncpg.Connection, invoice_id: uuid.UUID, *, lock: bool = False
) -> asyncpg.Record | None:
    """The appointment an invoice pays for (None: none)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {APPOINTMENT} FROM appointments a WHERE a.invoice_id = $1" + (" FOR UPDATE" if lock else ""),
        invoice_id,
    )
    return row


async def list_appointments_for(
    conn: asyncpg.Connection,
    user_id: uuid.UUID,
    *,
    upcoming: bool,
    after: tuple[dt.datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Own and dependents' appointments: upcoming soonest first, past latest first."""
    order, compare = ("ASC", ">") if upcoming else ("DESC", "<")
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {APPOINTMENT} FROM appointments a
             WHERE {CARES_FOR} AND (a.ends_at > now()) = $2
               AND ($3::timestamptz IS NULL OR (a.starts_at, a.id) {compare} ($3, $4::uuid))
             ORDER BY a.starts_at {order}, a.id {order} LIMIT $5""",
        user_id,
        upcoming,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return rows


async def claim_due_reminders(conn: asyncpg.Connection, now: dt.datetime, limit: int) -> list[asyncpg.Record]:
    """Booked visits whose next reminder is due at `now`, each moved on to the reminder after it
    (migration 0010), with the kind to send: the latest one due, so a job that was stopped
    sends the 15-minute reminder alone, not a late "tomorrow" before it. SKIP LOCKED: two jobs
    never claim the same visit."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""WITH due AS (
                SELECT id FROM appointments WHERE next_reminder_at <= $1
                 ORDER BY next_reminder_at LIMIT $2 FOR UPDATE SKIP LOCKED)
            UPDATE appointments a
               SET next_reminder_at = (SELECT min(r.at) FROM appointment_reminders(a.starts_at) r WHERE r.at > $1)
              FROM due WHERE a.id = due.id
            RETURNING {APPOINTMENT},
                      (SELECT r.kind FROM appointment_reminders(a.starts_at) r
                        WHERE r.at <= $1 ORDER BY r.at DESC LIMIT 1) AS reminder""",
        now,
        limit,
    )
    return rows


async def set_status(
    conn: asyncpg.Connection, appointment_id: uuid.UUID, status: str, sources: Sequence[str], **stamps: Any
) -> asyncpg.Record | None:
    """Move to `status` only from one of `sources` (states.sources); None when it was not there."""
    sets = "".join(f", {column} = now()" for column in stamps)  # checked_in_at, cancelled_at: names from code
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""UPDATE appointments a SET status = $2, updated_at = now(){sets}
             WHERE a.id = $1 AND a.status = ANY($3) RETURNING {APPOINTMENT}""",
        appointment_id,
        status,
        list(sources),
    )
    return row


async def move_appointment(
    conn: asyncpg.Connection,
    appointment_id: uuid.UUID,
    schedule_id: uuid.UUID,
    start: dt.datetime,
    end: dt.datetime,
    seat: int,
) -> asyncpg.Record | None:
    """Move to a new slot in one statement; raises ExclusionViolationError when it is taken."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""UPDATE appointments a
               SET schedule_id = $2, starts_at = $3, ends_at = $4, seat = $5,
                   queue_day = NULL, queue_number = NULL, updated_at = now()
             WHERE a.id = $1 RETURNING {APPOINTMENT}""",
        appointment_id,
        schedule_id,
        start,
        end,
        seat,
    )
    return row


async def void_invoice(conn: asyncpg.Connection, invoice_id: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE invoices SET status = 'void', updated_at = now() WHERE id = $1 AND status = 'pending'",
        invoice_id,
    )


async def person(conn: asyncpg.Connection, user_id: uuid.UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT id, personal_id, full_name, birthdate FROM users WHERE id = $1", user_id
    )
    return row


async def staff_day(
    conn: asyncpg.Connection, facility_id: uuid.UUID, start: dt.datetime, end: dt.datetime
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {APPOINTMENT} FROM appointments a
             WHERE a.facility_id = $1 AND a.starts_at >= $2 AND a.starts_at < $3
             ORDER BY a.starts_at, a.queue_number NULLS LAST, a.id""",
        facility_id,
        start,
        end,
    )
    return rows


# ------------------------------------------------------------------ waitlist

WAITLIST = (
    "w.id, w.status, w.patient_id, w.requested_by, w.facility_id, w.doctor_id, w.service_id, "
    "w.date_from, w.date_to, w.mode, w.offer_appointment_id"
)


async def insert_waitlist_entry(conn: asyncpg.Connection, values: dict[str, Any]) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""INSERT INTO waitlist_entries AS w
                (patient_id, requested_by, facility_id, doctor_id, service_id, date_from, date_to, mode)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {WAITLIST}""",
        values["patient_id"],
        values["requested_by"],
        values["facility_id"],
        values["doctor_id"],
        values["service_id"],
        values["date_from"],
        values["date_to"],
        values["mode"],
    )
    assert row is not None
    return row


async def waitlist_for(conn: asyncpg.Connection, user_id: uuid.UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {WAITLIST} FROM waitlist_entries w
             WHERE w.patient_id = $1 OR w.requested_by = $1
                OR EXISTS (SELECT 1 FROM guardianships g WHERE g.guardian_id = $1 AND g.dependent_id = w.patient_id)
             ORDER BY w.created_at DESC LIMIT 100""",
        user_id,
    )
    return rows


async def waitlist_entry_for(
    conn: asyncpg.Connection, user_id: uuid.UUID, entry_id: uuid.UUID
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {WAITLIST} FROM waitlist_entries w
             WHERE w.id = $2 AND (w.patient_id = $1 OR EXISTS (
                   SELECT 1 FROM guardianships g WHERE g.guardian_id = $1 AND g.dependent_id = w.patient_id))
             FOR UPDATE""",
        user_id,
        entry_id,
    )
    return row


async def next_waiting(
    conn: asyncpg.Connection,
    facility_id: uuid.UUID,
    doctor_id: uuid.UUID,
    service_id: uuid.UUID,
    day: dt.date,
    modes: Sequence[str],
    skip: Sequence[uuid.UUID],
) -> asyncpg.Record | None:
    """The longest-waiting entry this slot suits, locked (SKIP LOCKED: another offer may be taking one)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {WAITLIST} FROM waitlist_entries w
             WHERE w.status = 'waiting' AND w.facility_id = $1
               AND (w.doctor_id IS NULL OR w.doctor_id = $2) AND (w.service_id IS NULL OR w.service_id = $3)
               AND $4 BETWEEN w.date_from AND w.date_to
               AND (w.mode IS NULL OR w.mode = ANY($5)) AND NOT (w.id = ANY($6))
             ORDER BY w.created_at, w.id LIMIT 1
             FOR UPDATE SKIP LOCKED""",
        facility_id,
        doctor_id,
        service_id,
        day,
        list(modes),
        list(skip),
    )
    return row


async def set_waitlist_status(
    conn: asyncpg.Connection, entry_id: uuid.UUID, status: str, offer_appointment_id: uuid.UUID | None
) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""UPDATE waitlist_entries w SET status = $2, offer_appointment_id = $3, updated_at = now()
             WHERE w.id = $1 RETURNING {WAITLIST}""",
        entry_id,
        status,
        offer_appointment_id,
    )
    assert row is not None
    return row


async def renew_hold(
    conn: asyncpg.Connection, appointment_id: uuid.UUID, until: dt.datetime
) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"UPDATE appointments a SET hold_expires_at = $2, updated_at = now() WHERE a.id = $1 RETURNING {APPOINTMENT}",
        appointment_id,
        until,
    )
    assert row is not None
    return row


async def detach_invoice(conn: asyncpg.Connection, appointment_id: uuid.UUID) -> None:
    """The invoice moves to the appointment that re-took this one's slot."""
    await conn.execute("UPDATE appointments SET invoice_id = NULL WHERE id = $1", appointment_id)
