"""Booking through HTTP, one request at a time: availability, booking, holds and invoices, limits,
Idempotency-Key, cancel, reschedule, check-in, staff routes, dependents, and object-level access.

Every test books its own doctor and service (tests.factories.own_clinic), so the shared session
database never makes one test see another's appointments. Rows are checked in the database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from typing import Any

import asyncpg
import pytest

from api.booking.housekeeping import remind
from api.booking.reminders import send_due_reminders
from tests.conftest import make_settings
from tests.factories import (
    Citizen,
    OwnClinic,
    Session,
    child_of,
    clinic_at,
    clinic_today,
    grant_staff,
    insert_device,
    insert_user,
    notify,
    own_clinic,
    pushing_in_process,
    serve,
    sign_in,
)

HOME = "PK-BINHAN"  # the demo facility this file's clinics are at
ELSEWHERE = "TYT-QUAICANG"  # a second facility (limits per facility, staff of another facility)
ALL_DAY = (("00:00", "23:45"),)


def day(offset: int) -> dt.date:
    return clinic_today() + dt.timedelta(days=offset)


def when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    return body


async def book(
    client: Any,
    session: Session,
    clinic: OwnClinic,
    start: dt.datetime,
    *,
    key: str | None = None,
    **extra: Any,
) -> Any:
    return await client.post(
        "/v1/appointments",
        json=clinic.booking(start, **extra),
        headers={**session.headers, "Idempotency-Key": key or str(uuid.uuid4())},
    )


async def booked(
    client: Any, session: Session, clinic: OwnClinic, start: dt.datetime, **extra: Any
) -> dict[str, Any]:
    response = await book(client, session, clinic, start, **extra)
    assert response.status_code == 201, response.text
    return response.json()


async def free(
    client: Any, clinic: OwnClinic, first: dt.date, last: dt.date | None = None, **params: Any
) -> dict[dt.datetime, int]:
    """The clinic's free slots: start → remaining."""
    response = await client.get("/v1/availability", params=clinic.availability(first, last, **params))
    assert response.status_code == 200, response.text
    return {when(s["start"]): s["remaining"] for s in response.json()["slots"]}


async def visit_is_now(db: Any, appointment_id: Any, *, minutes_from_now: int = 30) -> None:
    """Time passes: the visit now starts soon, inside its check-in window."""
    await db.execute(
        """UPDATE appointments SET starts_at = now() + make_interval(mins => $2),
                                   ends_at = now() + make_interval(mins => $2 + 15) WHERE id = $1""",
        uuid.UUID(str(appointment_id)),
        minutes_from_now,
    )


async def row(db: Any, appointment_id: Any) -> Any:
    return await db.fetchrow("SELECT * FROM appointments WHERE id = $1", uuid.UUID(str(appointment_id)))


async def notes(db: Any, appointment_id: Any) -> list[Any]:
    return await db.fetch(
        "SELECT user_id, kind, not_before, push_state, params FROM notifications WHERE subject = $1 ORDER BY created_at, kind",
        f"appointment:{appointment_id}",
    )


async def reminders_as_of(
    db: Any, appointment_id: Any, *times: dt.datetime
) -> list[list[tuple[str, uuid.UUID]]]:
    """The reminder job run at each of `times` in turn, as if it were then: the reminders it wrote
    for this appointment each time, (kind, recipient). In a transaction rolled back after, as the
    job reminds every visit due by then and other tests' visits must not keep its rows."""
    subject = f"appointment:{appointment_id}"
    query = (
        "SELECT id, kind, user_id FROM notifications WHERE subject = $1 AND kind LIKE 'appointment_reminder%'"
    )
    written: list[list[tuple[str, uuid.UUID]]] = []
    seen = {r["id"] for r in await db.fetch(query, subject)}
    transaction = db.transaction()
    await transaction.start()
    try:
        for now in times:
            await send_due_reminders(db, now)
            new = [r for r in await db.fetch(query, subject) if r["id"] not in seen]
            written.append(sorted((r["kind"], r["user_id"]) for r in new))
            seen.update(r["id"] for r in new)
    finally:
        await transaction.rollback()
    return written


async def user_id(session: Session) -> uuid.UUID:
    return uuid.UUID(session.user["id"])


async def staff(client: Any, db: Any, issuer: Any, facility_code: str, role: str) -> Session:
    person = Citizen(name="Quàng Văn Lễ Tân")
    await grant_staff(db, person, facility_code, role)
    return await sign_in(client, issuer, person)


def card_qr(citizen: Citizen, **changes: str) -> str:
    """The QR text on `citizen`'s chip ID card, name printed without diacritics as many cards do."""
    fields = {
        "personal_id": citizen.personal_id,
        "old_id": "",
        "name": "NGUYEN VAN BINH" if citizen.name == "Nguyễn Văn Bình" else citizen.name.upper(),
        "born": citizen.born.strftime("%d%m%Y"),
        "sex": "Nam" if citizen.gender == "male" else "Nữ",
        "address": "Phường Mường Thanh, Điện Biên Phủ",
        "issued": "15042021",
    }
    fields.update(changes)
    return "|".join(fields.values())


# --- availability --------------------------------------------------------------------------------


async def test_availability_lists_the_slots_of_a_schedule_in_clinic_time(client, db):
    clinic = await own_clinic(db, HOME, windows=(("08:00", "09:00"), ("13:30", "14:00")))
    target = day(3)
    response = await client.get("/v1/availability", params=clinic.availability(target))
    assert response.status_code == 200, response.text
    slots = response.json()["slots"]
    assert [s["start"] for s in slots] == [
        f"{target}T08:00:00+07:00",
        f"{target}T08:15:00+07:00",
        f"{target}T08:30:00+07:00",
        f"{target}T08:45:00+07:00",
        f"{target}T13:30:00+07:00",
        f"{target}T13:45:00+07:00",
    ]
    assert slots[0] == {
        "doctor_id": str(clinic.doctor_id),
        "service_id": str(clinic.service_id),
        "facility_id": str(clinic.facility_id),
        "start": f"{target}T08:00:00+07:00",
        "end": f"{target}T08:15:00+07:00",
        "modes": ["in_person"],
        "remaining": 1,
    }
    # Also found through the facility and the service.
    by_facility = await client.get(
        "/v1/availability",
        params={
            "facility_id": str(clinic.facility_id),
            "service_id": str(clinic.service_id),
            "date_from": target.isoformat(),
            "date_to": target.isoformat(),
        },
    )
    assert [s["start"] for s in by_facility.json()["slots"]] == [s["start"] for s in slots]


async def test_availability_never_lists_past_or_unreleased_slots(client, db):
    clinic = await own_clinic(db, HOME, windows=ALL_DAY, horizon_days=3, valid_from=day(-2))
    listed = await free(client, clinic, day(-1), day(6))
    now = utcnow()
    assert listed, "today's remaining slots at least"
    assert all(start > now for start in listed)
    last_open = day(3) if dt.datetime.now(dt.timezone(dt.timedelta(hours=7))).hour >= 7 else day(2)
    assert max(start.date() for start in listed) == last_open
    assert all(start.utcoffset() == dt.timedelta(hours=7) for start in listed)


@pytest.mark.parametrize(
    ("first", "last"),
    [(5, 4), (0, 31), (-40, 0)],
    ids=["backwards", "32 days", "40 days back"],
)
async def test_availability_range_is_bounded(client, db, first, last):
    clinic = await own_clinic(db, HOME)
    response = await client.get("/v1/availability", params=clinic.availability(day(first), day(last)))
    problem(response, 422, "invalid_date_range")


async def test_availability_accepts_31_days_and_needs_a_doctor_or_facility(client, db):
    clinic = await own_clinic(db, HOME)
    assert (
        await client.get("/v1/availability", params=clinic.availability(day(0), day(30)))
    ).status_code == 200
    response = await client.get(
        "/v1/availability", params={"date_from": day(1).isoformat(), "date_to": day(2).isoformat()}
    )
    problem(response, 422, "validation_failed")


async def test_booked_and_held_slots_disappear_from_availability(client, db, issuer):
    clinic = await own_clinic(db, HOME, windows=(("08:00", "08:45"),))
    prepaid = await own_clinic(db, HOME, windows=(("08:00", "08:45"),), prepaid=True, price=120_000)
    target = day(4)
    patient = await sign_in(client, issuer)
    await booked(client, patient, clinic, clinic_at(target, "08:15"))
    assert list(await free(client, clinic, target)) == [
        clinic_at(target, "08:00"),
        clinic_at(target, "08:30"),
    ]

    held = await booked(client, patient, prepaid, clinic_at(target, "08:30"))
    assert held["status"] == "held"
    assert list(await free(client, prepaid, target)) == [
        clinic_at(target, "08:00"),
        clinic_at(target, "08:15"),
    ]
    # Once the hold has run out the slot is free again, before any job has swept it.
    await db.execute(
        "UPDATE appointments SET hold_expires_at = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(held["id"]),
    )
    assert clinic_at(target, "08:30") in await free(client, prepaid, target)


async def test_capacity_shows_remaining_places(client, db, issuer):
    clinic = await own_clinic(db, HOME, windows=(("08:00", "08:30"),), capacity=3, price=0)
    target, start = day(5), clinic_at(day(5), "08:00")
    assert await free(client, clinic, target) == {start: 3, clinic_at(target, "08:15"): 3}
    first = await booked(client, await sign_in(client, issuer), clinic, start)
    assert await free(client, clinic, target) == {start: 2, clinic_at(target, "08:15"): 3}
    second = await booked(client, await sign_in(client, issuer), clinic, start)
    third = await booked(client, await sign_in(client, issuer), clinic, start)
    assert await free(client, clinic, target) == {clinic_at(target, "08:15"): 3}
    problem(await book(client, await sign_in(client, issuer), clinic, start), 409, "slot_taken")
    seats = [(await row(db, a["id"]))["seat"] for a in (first, second, third)]
    assert sorted(seats) == [1, 2, 3]
    assert [a["queue_number"] for a in (first, second, third)] == [1, 2, 3]


async def test_mode_filter(client, db):
    both = await own_clinic(db, HOME, windows=(("08:00", "08:15"),), modes=("in_person", "video"))
    in_person = await own_clinic(db, HOME, windows=(("08:00", "08:15"),))
    target = day(3)
    for mode, expected in (("video", 1), ("in_person", 1)):
        response = await client.get("/v1/availability", params=both.availability(target, mode=mode))
        assert len(response.json()["slots"]) == expected
    assert response.json()["slots"][0]["modes"] == ["in_person", "video"]
    assert await free(client, in_person, target, mode="video") == {}
    assert len(await free(client, in_person, target, mode="in_person")) == 1
    bad = await client.get("/v1/availability", params=both.availability(target, mode="phone"))
    problem(bad, 422, "validation_failed")


# --- booking ---------------------------------------------------------------------------------


async def test_booking_a_free_slot(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    start = clinic_at(day(3), "09:30")
    response = await book(client, patient, clinic, start, reason="Ho kéo dài")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "booked"
    assert when(body["start"]) == start and body["start"].endswith("+07:00")
    assert when(body["end"]) == start + dt.timedelta(minutes=15)
    assert body["mode"] == "in_person"
    assert body["queue_number"] == 1
    assert body["hold_expires_at"] is None and body["invoice_id"] is None
    assert body["patient_id"] == patient.user["id"] and body["reason"] == "Ho kéo dài"
    assert (body["doctor_id"], body["service_id"], body["facility_id"]) == (
        str(clinic.doctor_id),
        str(clinic.service_id),
        str(clinic.facility_id),
    )
    stored = await row(db, body["id"])
    assert stored["status"] == "booked" and stored["seat"] == 1
    assert stored["patient_id"] == stored["booked_by"] == await user_id(patient)
    assert stored["schedule_id"] == clinic.schedule_id
    assert (stored["queue_day"], stored["queue_number"]) == (day(3), 1)
    assert stored["starts_at"] == start

    # The next in-person visit with this doctor that day is number 2; GET shows what POST said.
    second = await booked(client, await sign_in(client, issuer), clinic, clinic_at(day(3), "08:00"))
    assert second["queue_number"] == 2
    got = await client.get(f"/v1/appointments/{body['id']}", headers=patient.headers)
    assert got.status_code == 200 and got.json() == body
    upcoming = await client.get("/v1/appointments", params={"scope": "upcoming"}, headers=patient.headers)
    assert [a["id"] for a in upcoming.json()["items"]] == [body["id"]]
    past = await client.get("/v1/appointments", params={"scope": "past"}, headers=patient.headers)
    assert past.json()["items"] == []


async def test_an_appointments_doctor_service_and_facility_are_its_schedules(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    other = await own_clinic(db, HOME)  # another doctor and service at the same facility
    body = await booked(client, await sign_in(client, issuer), clinic, clinic_at(day(3), "09:00"))
    for column, value in (("doctor_id", other.doctor_id), ("service_id", other.service_id)):
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="appointments_schedule_fkey"):
            await db.execute(
                f"UPDATE appointments SET {column} = $2 WHERE id = $1", uuid.UUID(body["id"]), value
            )
    stored = await row(db, body["id"])
    assert (stored["doctor_id"], stored["service_id"]) == (clinic.doctor_id, clinic.service_id)


async def test_counting_a_slots_places_reads_that_time_not_the_doctors_history(db):
    """The booking functions keep generic plans (migration 0006). Whichever index such a plan
    uses, counting the places taken in a slot reads the appointments near that time only
    (migration 0008); a plan made before the table had statistics used to read every visit the
    doctor ever had."""
    clinic = await own_clinic(db, HOME)
    patient = await insert_user(db)
    first = dt.datetime(2031, 1, 6, 1, 0, tzinfo=dt.UTC)
    await db.execute(
        """INSERT INTO appointments (patient_id, booked_by, facility_id, doctor_id, service_id, schedule_id,
                                     starts_at, ends_at, mode, status, seat)
           SELECT $1, $1, $2, $3, $4, $5, $6::timestamptz + n * interval '15 minutes',
                  $6::timestamptz + (n + 1) * interval '15 minutes',
                  'in_person', 'booked', 1
             FROM generate_series(0, 4999) n""",
        patient,
        clinic.facility_id,
        clinic.doctor_id,
        clinic.service_id,
        clinic.schedule_id,
        first,
    )
    start = first + dt.timedelta(days=30)
    args = (clinic.doctor_id, start, start + dt.timedelta(minutes=15))
    count = "SELECT booking_places_taken($1, $2, $3)"
    async with db.transaction():
        await db.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await db.execute("SET LOCAL enable_seqscan = off")
        assert await db.fetchval(count, *args) == 1  # plans it, and reads the catalogue once
        plan = json.loads(await db.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {count}", *args))
    pages = plan[0]["Plan"]["Shared Hit Blocks"] + plan[0]["Plan"]["Shared Read Blocks"]
    assert pages < 40, plan  # 5,000 visits fill well over 100 pages of table and index


async def test_a_video_visit_has_no_queue_number(client, db, issuer):
    clinic = await own_clinic(db, HOME, modes=("video",), windows=(("17:00", "19:00"),))
    patient = await sign_in(client, issuer)
    body = await booked(client, patient, clinic, clinic_at(day(3), "17:15"), mode="video")
    assert body["status"] == "booked" and body["mode"] == "video"
    assert body["queue_number"] is None
    stored = await row(db, body["id"])
    assert stored["queue_number"] is None and stored["queue_day"] is None
    # In person is not offered by this schedule.
    problem(
        await book(client, patient, clinic, clinic_at(day(3), "17:30"), mode="in_person"), 422, "not_a_slot"
    )


async def test_a_prepaid_service_is_held_with_a_pending_invoice_at_its_price(client, db, issuer):
    clinic = await own_clinic(db, HOME, prepaid=True, price=150_000, modes=("video",), duration=20)
    patient = await sign_in(client, issuer)
    before = utcnow()
    body = await booked(client, patient, clinic, clinic_at(day(3), "08:20"), mode="video")
    assert body["status"] == "held"
    assert body["queue_number"] is None
    expires = when(body["hold_expires_at"])
    assert before + dt.timedelta(minutes=10) <= expires <= utcnow() + dt.timedelta(minutes=10)
    invoice = await db.fetchrow("SELECT * FROM invoices WHERE id = $1", uuid.UUID(body["invoice_id"]))
    assert invoice["status"] == "pending"
    assert invoice["amount_vnd"] == 150_000
    assert (invoice["patient_id"], invoice["facility_id"], invoice["service_id"]) == (
        await user_id(patient),
        clinic.facility_id,
        clinic.service_id,
    )
    stored = await row(db, body["id"])
    assert stored["invoice_id"] == invoice["id"] and stored["status"] == "held"
    # Not booked yet: no confirmation or reminders, only the warning before the hold runs out.
    sent = await notes(db, body["id"])
    assert [(n["kind"], n["not_before"]) for n in sent] == [
        ("appointment_hold_expiring", stored["hold_expires_at"] - dt.timedelta(minutes=3))
    ]


async def test_the_price_is_the_services_never_the_clients(client, db, issuer):
    clinic = await own_clinic(db, HOME, prepaid=True, price=80_000)
    patient = await sign_in(client, issuer)
    response = await book(client, patient, clinic, clinic_at(day(3), "08:00"), price_vnd=1)
    problem(response, 422, "validation_failed")
    body = await booked(client, patient, clinic, clinic_at(day(3), "08:00"))
    assert (
        await db.fetchval("SELECT amount_vnd FROM invoices WHERE id = $1", uuid.UUID(body["invoice_id"]))
        == 80_000
    )


@pytest.mark.parametrize(
    "start",
    [
        "{d}T08:05:00+07:00",  # off the grid
        "{d}T08:00:30+07:00",  # seconds off
        "{d}T12:00:00+07:00",  # the window's end
        "{d}T07:45:00+07:00",  # before the window
        "{d}T08:00:00",  # no offset: a naive time is never a slot
        "{d}T08:00:00+08:00",  # the right wall-clock time in another zone is another instant
    ],
)
async def test_not_a_slot(client, db, issuer, start):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    body = clinic.booking(clinic_at(day(3), "08:00")) | {"start": start.format(d=day(3))}
    response = await client.post(
        "/v1/appointments", json=body, headers={**patient.headers, "Idempotency-Key": str(uuid.uuid4())}
    )
    problem(response, 422, "not_a_slot")
    assert await db.fetchval("SELECT count(*) FROM appointments WHERE doctor_id = $1", clinic.doctor_id) == 0


async def test_the_same_instant_in_utc_is_the_slot(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    start = clinic_at(day(3), "08:00").astimezone(dt.UTC)
    body = await booked(client, patient, clinic, start)
    assert body["start"] == f"{day(3)}T08:00:00+07:00"


async def test_a_slot_in_the_past_or_beyond_the_horizon_is_not_open(client, db, issuer):
    clinic = await own_clinic(db, HOME, windows=ALL_DAY, horizon_days=5, valid_from=day(-3))
    patient = await sign_in(client, issuer)
    problem(await book(client, patient, clinic, clinic_at(day(-1), "10:00")), 422, "slot_not_open")
    problem(await book(client, patient, clinic, clinic_at(day(7), "10:00")), 422, "slot_not_open")
    # Earlier today, already begun.
    now = dt.datetime.now(dt.timezone(dt.timedelta(hours=7)))
    begun = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    if begun.time() >= dt.time(23, 45):  # the schedule's last slot of the day begins at 23:30
        begun = begun.replace(minute=30)
    problem(await book(client, patient, clinic, begun), 422, "slot_not_open")
    assert await db.fetchval("SELECT count(*) FROM appointments WHERE doctor_id = $1", clinic.doctor_id) == 0
    assert (await book(client, patient, clinic, clinic_at(day(4), "10:00"))).status_code == 201


async def test_a_day_off_has_no_slots_to_book(client, db, issuer):
    admin = await staff(client, db, issuer, HOME, "facility_staff")
    clinic = await own_clinic(db, HOME, windows=(("08:00", "10:00"),))
    target = day(6)
    assert len(await free(client, clinic, target)) == 8
    whole = await client.post(
        f"/v1/staff/schedules/{clinic.schedule_id}/exceptions",
        json={"day": target.isoformat(), "reason": "Nghỉ phép"},
        headers=admin.headers,
    )
    assert whole.status_code == 201, whole.text
    assert whole.json()["start"] is None and whole.json()["end"] is None
    assert await free(client, clinic, target) == {}
    patient = await sign_in(client, issuer)
    problem(await book(client, patient, clinic, clinic_at(target, "08:00")), 422, "not_a_slot")

    part = await client.post(
        f"/v1/staff/schedules/{clinic.schedule_id}/exceptions",
        json={"day": day(7).isoformat(), "start": "08:30", "end": "09:00", "reason": "Giao ban"},
        headers=admin.headers,
    )
    assert part.status_code == 201, part.text
    assert (part.json()["start"], part.json()["end"]) == ("08:30", "09:00")
    assert [s.strftime("%H:%M") for s in await free(client, clinic, day(7))] == [
        "08:00",
        "08:15",
        "09:00",
        "09:15",
        "09:30",
        "09:45",
    ]
    rows = await db.fetch(
        "SELECT day, start_time, end_time, reason FROM schedule_exceptions WHERE schedule_id = $1 ORDER BY day",
        clinic.schedule_id,
    )
    assert [tuple(r) for r in rows] == [
        (target, None, None, "Nghỉ phép"),
        (day(7), dt.time(8, 30), dt.time(9, 0), "Giao ban"),
    ]
    bad = await client.post(
        f"/v1/staff/schedules/{clinic.schedule_id}/exceptions",
        json={"day": day(8).isoformat(), "start": "09:00"},
        headers=admin.headers,
    )
    problem(bad, 422, "validation_failed")


# --- limits ------------------------------------------------------------------------------------


async def test_nobody_is_in_two_places_at_once(client, db, issuer):
    here = await own_clinic(db, HOME, duration=30)
    there = await own_clinic(db, ELSEWHERE)
    patient = await sign_in(client, issuer)
    await booked(client, patient, here, clinic_at(day(3), "09:00"))  # 09:00–09:30
    problem(await book(client, patient, there, clinic_at(day(3), "09:15")), 409, "overlapping_appointment")
    problem(await book(client, patient, there, clinic_at(day(3), "09:00")), 409, "overlapping_appointment")
    assert (await book(client, patient, there, clinic_at(day(3), "09:30"))).status_code == 201
    assert await db.fetchval("SELECT count(*) FROM appointments WHERE doctor_id = $1", there.doctor_id) == 1


async def test_at_most_three_upcoming_visits_per_facility(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    other = await own_clinic(db, ELSEWHERE)
    patient = await sign_in(client, issuer)
    visits = [await booked(client, patient, clinic, clinic_at(day(d), "08:00")) for d in (3, 4, 5)]
    problem(await book(client, patient, clinic, clinic_at(day(6), "08:00")), 409, "too_many_appointments")
    # Another facility counts separately.
    assert (await book(client, patient, other, clinic_at(day(6), "08:00"))).status_code == 201
    # A cancelled visit no longer counts.
    cancel = await client.post(f"/v1/appointments/{visits[0]['id']}/cancel", headers=patient.headers)
    assert cancel.status_code == 200, cancel.text
    assert (await book(client, patient, clinic, clinic_at(day(6), "08:15"))).status_code == 201


# --- Idempotency-Key ----------------------------------------------------------------------------


async def test_a_retry_with_the_same_key_gets_the_first_answer(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    key = str(uuid.uuid4())
    first = await book(client, patient, clinic, clinic_at(day(3), "08:00"), key=key)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    again = await book(client, patient, clinic, clinic_at(day(3), "08:00"), key=key)
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert await db.fetchval("SELECT count(*) FROM appointments WHERE doctor_id = $1", clinic.doctor_id) == 1

    other_body = await book(client, patient, clinic, clinic_at(day(3), "08:15"), key=key)
    problem(other_body, 422, "idempotency_key_reused")
    assert await db.fetchval("SELECT count(*) FROM appointments WHERE doctor_id = $1", clinic.doctor_id) == 1
    # The key is the caller's own: someone else may use the same one.
    other = await book(client, await sign_in(client, issuer), clinic, clinic_at(day(3), "08:15"), key=key)
    assert other.status_code == 201 and "idempotent-replayed" not in other.headers


@pytest.mark.parametrize("everywhere", [False, True])
async def test_a_booking_needs_a_live_session(client, db, issuer, everywhere):
    """Booking checks the session in its own statement (book_appointment): after logout, or
    logout everywhere, the token still verifies but books nothing, replays nothing and learns
    nothing about the slot."""
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    start = clinic_at(day(3), "09:00")
    key = str(uuid.uuid4())
    await booked(client, patient, clinic, start, key=key)
    logout = await client.post("/v1/auth/logout", json={"everywhere": everywhere}, headers=patient.headers)
    assert logout.status_code == 204, logout.text
    patient_id = await user_id(patient)
    for attempt in (
        book(client, patient, clinic, clinic_at(day(3), "10:00")),  # a free slot
        book(client, patient, clinic, start, key=key),  # the same request again: no replay either
        book(client, patient, clinic, clinic_at(day(3), "09:07")),  # not a slot
    ):
        problem(await attempt, 401, "invalid_token")
    assert await db.fetchval("SELECT count(*) FROM appointments WHERE patient_id = $1", patient_id) == 1
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE user_id = $1", patient_id) == 1


async def test_the_key_is_required(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    body = clinic.booking(clinic_at(day(3), "08:00"))
    problem(
        await client.post("/v1/appointments", json=body, headers=patient.headers),
        400,
        "idempotency_key_required",
    )
    empty = await client.post(
        "/v1/appointments", json=body, headers={**patient.headers, "Idempotency-Key": ""}
    )
    problem(empty, 400, "idempotency_key_required")
    assert await db.fetchval("SELECT count(*) FROM appointments WHERE doctor_id = $1", clinic.doctor_id) == 0


async def test_a_failed_request_is_not_remembered(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    start = clinic_at(day(3), "08:00")
    holder, patient = await sign_in(client, issuer), await sign_in(client, issuer)
    taken = await booked(client, holder, clinic, start)
    key = str(uuid.uuid4())
    problem(await book(client, patient, clinic, start, key=key), 409, "slot_taken")
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE key = $1", key) == 0
    await client.post(f"/v1/appointments/{taken['id']}/cancel", headers=holder.headers)
    retry = await book(client, patient, clinic, start, key=key)
    assert retry.status_code == 201 and "idempotent-replayed" not in retry.headers


# --- cancel --------------------------------------------------------------------------------------


async def test_cancel_frees_the_slot_and_cancels_the_reminders(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    start = clinic_at(day(3), "08:00")
    body = await booked(client, patient, clinic, start)
    assert start not in await free(client, clinic, day(3))
    response = await client.post(f"/v1/appointments/{body['id']}/cancel", headers=patient.headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert start in await free(client, clinic, day(3))
    stored = await row(db, body["id"])
    assert stored["status"] == "cancelled" and stored["cancelled_at"] is not None
    assert stored["queue_number"] == 1, "a cancelled visit keeps its number"
    states = {n["kind"]: n["push_state"] for n in await notes(db, body["id"])}
    assert states["appointment_cancelled"] == "pending"
    assert stored["next_reminder_at"] is None
    assert await reminders_as_of(
        db, body["id"], start - dt.timedelta(hours=24), start - dt.timedelta(minutes=15)
    ) == [[], []]
    # Once is enough.
    problem(
        await client.post(f"/v1/appointments/{body['id']}/cancel", headers=patient.headers),
        409,
        "invalid_transition",
    )
    # Someone else can now book it.
    assert (await book(client, await sign_in(client, issuer), clinic, start)).status_code == 201


async def test_cancelling_a_hold_voids_its_invoice(client, db, issuer):
    clinic = await own_clinic(db, HOME, prepaid=True, price=200_000)
    patient = await sign_in(client, issuer)
    body = await booked(client, patient, clinic, clinic_at(day(3), "08:00"))
    response = await client.post(f"/v1/appointments/{body['id']}/cancel", headers=patient.headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert (
        await db.fetchval("SELECT status FROM invoices WHERE id = $1", uuid.UUID(body["invoice_id"]))
        == "void"
    )
    expiring = [n for n in await notes(db, body["id"]) if n["kind"] == "appointment_hold_expiring"]
    assert [n["push_state"] for n in expiring] == ["cancelled"]


async def test_too_late_to_cancel_or_move(client, db, issuer):
    clinic = await own_clinic(db, HOME, windows=ALL_DAY, valid_from=day(-1))
    patient = await sign_in(client, issuer)
    soon = min(
        s for s in await free(client, clinic, day(0), day(1)) if s > utcnow() + dt.timedelta(minutes=30)
    )
    assert soon - utcnow() < dt.timedelta(minutes=120)
    body = await booked(client, patient, clinic, soon)
    problem(
        await client.post(f"/v1/appointments/{body['id']}/cancel", headers=patient.headers),
        409,
        "too_late_to_cancel",
    )
    later = (soon + dt.timedelta(days=2)).isoformat()
    moved = await client.post(
        f"/v1/appointments/{body['id']}/reschedule", json={"start": later}, headers=patient.headers
    )
    problem(moved, 409, "too_late_to_cancel")
    stored = await row(db, body["id"])
    assert stored["status"] == "booked" and stored["starts_at"] == soon
    # Less than a day ahead: the 15-minute reminder only, never a "tomorrow" one.
    assert stored["next_reminder_at"] == soon - dt.timedelta(minutes=15)
    me = await user_id(patient)
    assert await reminders_as_of(db, body["id"], utcnow(), soon - dt.timedelta(minutes=15)) == [
        [],
        [("appointment_reminder_15m", me)],
    ]


# --- reschedule ----------------------------------------------------------------------------------


async def test_reschedule_keeps_the_appointment_and_its_invoice(client, db, issuer):
    clinic = await own_clinic(db, HOME, prepaid=True, price=120_000)
    patient = await sign_in(client, issuer)
    old, new = clinic_at(day(3), "08:00"), clinic_at(day(4), "10:30")
    body = await booked(client, patient, clinic, old)
    response = await client.post(
        f"/v1/appointments/{body['id']}/reschedule", json={"start": new.isoformat()}, headers=patient.headers
    )
    assert response.status_code == 200, response.text
    moved = response.json()
    assert moved["id"] == body["id"] and moved["invoice_id"] == body["invoice_id"]
    assert moved["status"] == "held" and when(moved["start"]) == new
    assert (
        await db.fetchval("SELECT status FROM invoices WHERE id = $1", uuid.UUID(body["invoice_id"]))
        == "pending"
    )
    assert await db.fetchval("SELECT count(*) FROM appointments WHERE doctor_id = $1", clinic.doctor_id) == 1
    assert old in await free(client, clinic, day(3))
    assert new not in await free(client, clinic, day(4))


async def test_reschedule_moves_the_queue_number_and_the_reminders(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    old, new = clinic_at(day(3), "08:00"), clinic_at(day(5), "09:00")
    await booked(
        client, await sign_in(client, issuer), clinic, clinic_at(day(5), "08:00")
    )  # number 1 on day 5
    body = await booked(client, patient, clinic, old)
    # The job wrote the old time's first reminder; quiet hours held its push back.
    written = await notify(
        db,
        await user_id(patient),
        "appointment_reminder_24h",
        params={"appointment_id": uuid.UUID(body["id"]), "start": old},
        subject=f"appointment:{body['id']}",
    )
    response = await client.post(
        f"/v1/appointments/{body['id']}/reschedule", json={"start": new.isoformat()}, headers=patient.headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["queue_number"] == 2
    stored = await row(db, body["id"])
    assert (stored["queue_day"], stored["queue_number"]) == (day(5), 2)
    assert stored["next_reminder_at"] == new - dt.timedelta(hours=24)
    assert await db.fetchval("SELECT push_state FROM notifications WHERE id = $1", written) == "cancelled"
    pending = {n["kind"] for n in await notes(db, body["id"]) if n["push_state"] == "pending"}
    assert pending == {"appointment_booked", "appointment_rescheduled"}
    me = await user_id(patient)
    assert await reminders_as_of(
        db,
        body["id"],
        old - dt.timedelta(minutes=15),
        new - dt.timedelta(hours=24),
        new - dt.timedelta(minutes=15),
    ) == [[], [("appointment_reminder_24h", me)], [("appointment_reminder_15m", me)]]


async def test_moving_back_to_the_first_time_keeps_reminders(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    first, second = clinic_at(day(3), "08:00"), clinic_at(day(4), "08:00")
    body = await booked(client, patient, clinic, first)
    for start in (second, first):
        response = await client.post(
            f"/v1/appointments/{body['id']}/reschedule",
            json={"start": start.isoformat()},
            headers=patient.headers,
        )
        assert response.status_code == 200, response.text
    assert (await row(db, body["id"]))["next_reminder_at"] == first - dt.timedelta(hours=24)


async def test_reschedule_to_a_taken_slot_changes_nothing(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    patient, other = await sign_in(client, issuer), await sign_in(client, issuer)
    mine = await booked(client, patient, clinic, clinic_at(day(3), "08:00"))
    theirs = await booked(client, other, clinic, clinic_at(day(3), "09:00"))
    before = [await row(db, mine["id"]), await row(db, theirs["id"])]
    free_before = await free(client, clinic, day(3))
    response = await client.post(
        f"/v1/appointments/{mine['id']}/reschedule",
        json={"start": clinic_at(day(3), "09:00").isoformat()},
        headers=patient.headers,
    )
    problem(response, 409, "slot_taken")
    assert [await row(db, mine["id"]), await row(db, theirs["id"])] == before
    assert await free(client, clinic, day(3)) == free_before
    off_grid = await client.post(
        f"/v1/appointments/{mine['id']}/reschedule",
        json={"start": clinic_at(day(3), "09:05").isoformat()},
        headers=patient.headers,
    )
    problem(off_grid, 422, "not_a_slot")
    assert await row(db, mine["id"]) == before[0]


# --- check-in --------------------------------------------------------------------------------


async def test_check_in_with_the_patients_card(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    citizen = Citizen(name="Nguyễn Văn Bình")
    patient = await sign_in(client, issuer, citizen)
    body = await booked(client, patient, clinic, clinic_at(day(3), "08:00"))
    url = f"/v1/appointments/{body['id']}/check-in"
    problem(await client.post(url, json={}, headers=patient.headers), 409, "not_check_in_time")
    await visit_is_now(db, body["id"], minutes_from_now=61)
    problem(await client.post(url, json={}, headers=patient.headers), 409, "not_check_in_time")
    await visit_is_now(db, body["id"])
    await notify(  # a reminder the job wrote, its push held back (quiet hours)
        db,
        await user_id(patient),
        "appointment_reminder_15m",
        params={"appointment_id": uuid.UUID(body["id"]), "start": utcnow()},
        subject=f"appointment:{body['id']}",
    )

    wrong_birthday = card_qr(citizen, born="01011991")
    problem(
        await client.post(url, json={"cccd_qr": wrong_birthday}, headers=patient.headers),
        422,
        "identity_mismatch",
    )
    someone_else = card_qr(Citizen(name="Nguyễn Văn Bình", born=citizen.born))
    problem(
        await client.post(url, json={"cccd_qr": someone_else}, headers=patient.headers),
        422,
        "identity_mismatch",
    )
    problem(
        await client.post(url, json={"cccd_qr": "garbage"}, headers=patient.headers), 422, "identity_mismatch"
    )
    assert (await row(db, body["id"]))["status"] == "booked"

    response = await client.post(url, json={"cccd_qr": card_qr(citizen)}, headers=patient.headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "checked_in"
    stored = await row(db, body["id"])
    assert stored["status"] == "checked_in" and stored["checked_in_at"] is not None
    assert stored["next_reminder_at"] is None
    reminders = [n["push_state"] for n in await notes(db, body["id"]) if "reminder" in n["kind"]]
    assert reminders == ["cancelled"], "the 15-minute reminder written but not pushed yet is withdrawn"
    problem(await client.post(url, json={}, headers=patient.headers), 409, "invalid_transition")


async def test_staff_of_the_facility_check_a_patient_in_by_their_card(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    citizen = Citizen(name="Lò Thị Hoa", gender="female", born=dt.date(1992, 7, 9))
    patient = await sign_in(client, issuer, citizen)
    body = await booked(client, patient, clinic, clinic_at(day(3), "08:00"))
    await visit_is_now(db, body["id"])
    url = f"/v1/appointments/{body['id']}/check-in"
    desk = await staff(client, db, issuer, HOME, "facility_staff")
    away = await staff(client, db, issuer, ELSEWHERE, "facility_staff")
    problem(
        await client.post(url, json={"cccd_qr": card_qr(citizen, name="LO THI HOA")}, headers=away.headers),
        404,
        "not_found",
    )
    assert (await row(db, body["id"]))["status"] == "booked"
    response = await client.post(
        url, json={"cccd_qr": card_qr(citizen, name="LÒ THỊ HOA")}, headers=desk.headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "checked_in"


# --- staff ---------------------------------------------------------------------------------------


async def test_staff_create_a_schedule_that_patients_can_book(client, db, issuer):
    admin = await staff(client, db, issuer, HOME, "admin")
    seed = await own_clinic(
        db, HOME, windows=(("08:00", "08:15"),), valid_until=day(0)
    )  # a doctor and service
    body = {
        "facility_id": str(seed.facility_id),
        "doctor_id": str(seed.doctor_id),
        "service_id": str(seed.service_id),
        "weekly": [{"weekday": day(10).isoweekday(), "start": "13:00", "end": "14:00"}],
        "valid_from": day(1).isoformat(),
        "capacity": 2,
        "buffer_minutes": 5,
    }
    response = await client.post("/v1/staff/schedules", json=body, headers=admin.headers)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["slot_minutes"] == 15 and created["capacity"] == 2 and created["active"] is True
    assert created["weekly"] == body["weekly"] and created["release_time"] == "07:00"
    assert await free(client, seed, day(10)) == {
        clinic_at(day(10), "13:00"): 2,
        clinic_at(day(10), "13:20"): 2,
        clinic_at(day(10), "13:40"): 2,
    }
    listed = await client.get(
        "/v1/staff/schedules", params={"facility_id": str(seed.facility_id)}, headers=admin.headers
    )
    assert created["id"] in {s["id"] for s in listed.json()}
    backwards = body | {"weekly": [{"weekday": 1, "start": "14:00", "end": "13:00"}]}
    problem(
        await client.post("/v1/staff/schedules", json=backwards, headers=admin.headers),
        422,
        "validation_failed",
    )
    not_here = body | {"doctor_id": str(uuid.uuid4())}
    problem(await client.post("/v1/staff/schedules", json=not_here, headers=admin.headers), 404, "not_found")


async def test_a_doctor_cannot_create_schedules_and_other_facilities_are_off_limits(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    appointment = await booked(client, patient, clinic, clinic_at(day(3), "08:00"))
    doctor = await staff(client, db, issuer, HOME, "doctor")
    away = await staff(client, db, issuer, ELSEWHERE, "admin")
    body = {
        "facility_id": str(clinic.facility_id),
        "doctor_id": str(clinic.doctor_id),
        "service_id": str(clinic.service_id),
        "weekly": [{"weekday": 1, "start": "13:00", "end": "14:00"}],
        "valid_from": day(1).isoformat(),
    }
    count = "SELECT count(*) FROM schedules WHERE doctor_id = $1"
    problem(await client.post("/v1/staff/schedules", json=body, headers=doctor.headers), 403, "forbidden")
    problem(await client.post("/v1/staff/schedules", json=body, headers=away.headers), 403, "forbidden")
    problem(await client.post("/v1/staff/schedules", json=body, headers=patient.headers), 403, "forbidden")
    assert await db.fetchval(count, clinic.doctor_id) == 1
    exception = {"day": day(3).isoformat()}
    url = f"/v1/staff/schedules/{clinic.schedule_id}/exceptions"
    problem(await client.post(url, json=exception, headers=away.headers), 404, "not_found")
    problem(await client.post(url, json=exception, headers=doctor.headers), 403, "forbidden")
    assert (
        await db.fetchval(
            "SELECT count(*) FROM schedule_exceptions WHERE schedule_id = $1", clinic.schedule_id
        )
        == 0
    )

    day_list = {"date": day(3).isoformat(), "facility_id": str(clinic.facility_id)}
    problem(
        await client.get("/v1/staff/appointments", params=day_list, headers=away.headers), 403, "forbidden"
    )
    problem(
        await client.get(
            "/v1/staff/schedules", params={"facility_id": str(clinic.facility_id)}, headers=away.headers
        ),
        403,
        "forbidden",
    )
    for action in ("no-show", "complete"):
        response = await client.post(
            f"/v1/staff/appointments/{appointment['id']}/{action}", headers=away.headers
        )
        problem(response, 404, "not_found")
    assert (await row(db, appointment["id"]))["status"] == "booked"
    # The doctor of the facility does see the day.
    seen = await client.get("/v1/staff/appointments", params=day_list, headers=doctor.headers)
    assert seen.status_code == 200 and appointment["id"] in {a["id"] for a in seen.json()}


async def test_the_days_list_no_show_and_complete(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    desk = await staff(client, db, issuer, HOME, "facility_staff")
    target = day(3)
    patients = [await sign_in(client, issuer) for _ in range(3)]
    visits = [
        await booked(client, p, clinic, clinic_at(target, hhmm))
        for p, hhmm in zip(patients, ("09:00", "08:00", "08:30"), strict=True)
    ]
    other_day = await booked(client, await sign_in(client, issuer), clinic, clinic_at(day(4), "08:00"))
    response = await client.get(
        "/v1/staff/appointments",
        params={"date": target.isoformat(), "facility_id": str(clinic.facility_id)},
        headers=desk.headers,
    )
    assert response.status_code == 200, response.text
    mine = [a for a in response.json() if a["doctor_id"] == str(clinic.doctor_id)]
    assert [a["start"][11:16] for a in mine] == ["08:00", "08:30", "09:00"]
    assert [a["queue_number"] for a in mine] == [2, 3, 1]
    assert other_day["id"] not in {a["id"] for a in response.json()}

    late, done, _ = visits
    # Nobody is a no-show before the visit begins.
    problem(
        await client.post(f"/v1/staff/appointments/{late['id']}/no-show", headers=desk.headers),
        409,
        "invalid_transition",
    )
    await db.execute(
        "UPDATE appointments SET starts_at = now() - interval '20 minutes', ends_at = now() - interval '5 minutes' WHERE id = $1",
        uuid.UUID(late["id"]),
    )
    response = await client.post(f"/v1/staff/appointments/{late['id']}/no-show", headers=desk.headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "no_show"
    assert (await row(db, late["id"]))["status"] == "no_show"
    problem(
        await client.post(f"/v1/staff/appointments/{late['id']}/complete", headers=desk.headers),
        409,
        "invalid_transition",
    )

    # Completed only after check-in.
    complete = f"/v1/staff/appointments/{done['id']}/complete"
    problem(await client.post(complete, headers=desk.headers), 409, "invalid_transition")
    await visit_is_now(db, done["id"], minutes_from_now=-5)  # arrived a little late: still open
    checked_in = await client.post(f"/v1/appointments/{done['id']}/check-in", json={}, headers=desk.headers)
    assert checked_in.status_code == 200, checked_in.text
    doctor = await staff(client, db, issuer, HOME, "doctor")
    response = await client.post(complete, headers=doctor.headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"
    assert (await row(db, done["id"]))["status"] == "completed"
    # A doctor may complete but not mark a no-show.
    problem(
        await client.post(f"/v1/staff/appointments/{visits[2]['id']}/no-show", headers=doctor.headers),
        403,
        "forbidden",
    )


# --- dependents and object-level access -----------------------------------------------------------


async def test_a_guardian_books_for_a_dependent(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    parent = Citizen(name="Lò Văn Cha", dependents=[child_of(name="Lò Thị Con")])
    guardian = await sign_in(client, issuer, parent)
    dependents = (await client.get("/v1/me/dependents", headers=guardian.headers)).json()
    child_id = dependents[0]["id"]
    body = await booked(client, guardian, clinic, clinic_at(day(3), "08:00"), patient_id=child_id)
    assert body["patient_id"] == child_id
    stored = await row(db, body["id"])
    assert (str(stored["patient_id"]), stored["booked_by"]) == (child_id, await user_id(guardian))
    got = await client.get(f"/v1/appointments/{body['id']}", headers=guardian.headers)
    assert got.status_code == 200 and got.json()["patient_id"] == child_id
    listed = await client.get("/v1/appointments", headers=guardian.headers)
    assert [a["id"] for a in listed.json()["items"]] == [body["id"]]
    # Both the guardian and the child are told.
    told = {(n["kind"], str(n["user_id"])) for n in await notes(db, body["id"])}
    assert {("appointment_booked", guardian.user["id"]), ("appointment_booked", child_id)} <= told
    # The parent and the child can each have their own visit at the same time.
    assert (await book(client, guardian, clinic, clinic_at(day(3), "08:00"))).status_code == 409  # slot_taken
    other = await own_clinic(db, HOME)
    assert (await book(client, guardian, other, clinic_at(day(3), "08:00"))).status_code == 201

    stranger = await sign_in(client, issuer)
    response = await book(client, stranger, clinic, clinic_at(day(3), "08:15"), patient_id=child_id)
    problem(response, 404, "not_found")
    response = await client.post(
        "/v1/waitlist",
        json={
            "facility_id": str(clinic.facility_id),
            "doctor_id": str(clinic.doctor_id),
            "date_from": day(3).isoformat(),
            "date_to": day(4).isoformat(),
            "patient_id": child_id,
        },
        headers={**stranger.headers, "Idempotency-Key": str(uuid.uuid4())},
    )
    problem(response, 404, "not_found")
    assert (
        await db.fetchval("SELECT count(*) FROM appointments WHERE patient_id = $1", uuid.UUID(child_id)) == 1
    )
    assert (
        await db.fetchval("SELECT count(*) FROM waitlist_entries WHERE patient_id = $1", uuid.UUID(child_id))
        == 0
    )


async def test_someone_elses_appointment_and_waitlist_entry_are_not_found(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    owner_citizen = Citizen()
    owner, intruder = await sign_in(client, issuer, owner_citizen), await sign_in(client, issuer)
    body = await booked(client, owner, clinic, clinic_at(day(3), "08:00"))
    entry = await client.post(
        "/v1/waitlist",
        json={
            "facility_id": str(clinic.facility_id),
            "doctor_id": str(clinic.doctor_id),
            "date_from": day(3).isoformat(),
            "date_to": day(3).isoformat(),
        },
        headers={**owner.headers, "Idempotency-Key": str(uuid.uuid4())},
    )
    assert entry.status_code == 201, entry.text
    entry_id = entry.json()["id"]
    before = await row(db, body["id"])
    entry_before = await db.fetchrow("SELECT * FROM waitlist_entries WHERE id = $1", uuid.UUID(entry_id))
    url = f"/v1/appointments/{body['id']}"
    attempts = [
        await client.get(url, headers=intruder.headers),
        await client.post(f"{url}/cancel", headers=intruder.headers),
        await client.post(
            f"{url}/reschedule",
            json={"start": clinic_at(day(3), "09:00").isoformat()},
            headers=intruder.headers,
        ),
        await client.post(f"{url}/check-in", json={}, headers=intruder.headers),
        await client.post(
            f"{url}/check-in", json={"cccd_qr": card_qr(owner_citizen)}, headers=intruder.headers
        ),
        await client.post(f"/v1/waitlist/{entry_id}/accept", headers=intruder.headers),
        await client.get(f"/v1/appointments/{uuid.uuid4()}", headers=intruder.headers),
    ]
    for response in attempts:
        problem(response, 404, "not_found")
    assert await row(db, body["id"]) == before
    assert (
        await db.fetchrow("SELECT * FROM waitlist_entries WHERE id = $1", uuid.UUID(entry_id)) == entry_before
    )
    assert (await client.get("/v1/appointments", headers=intruder.headers)).json()["items"] == []
    assert (await client.get("/v1/waitlist", headers=intruder.headers)).json() == []
    # Without a token, 401.
    assert (await client.get(url)).status_code == 401


# --- notifications ---------------------------------------------------------------------------------


async def test_booking_enqueues_the_confirmation_and_its_reminders_when_due(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    guardian = await sign_in(
        client, issuer, Citizen(name="Lò Văn Cha", dependents=[child_of(name="Lò Thị Con")])
    )
    child = uuid.UUID((await client.get("/v1/me/dependents", headers=guardian.headers)).json()[0]["id"])
    start = clinic_at(day(3), "10:45")
    before = utcnow()
    body = await booked(client, guardian, clinic, start, patient_id=str(child))
    sent = {n["kind"]: n for n in await notes(db, body["id"]) if n["user_id"] != child}
    assert set(sent) == {"appointment_booked"}, "reminders are written when due, not at booking"
    assert (
        before - dt.timedelta(seconds=5)
        <= sent["appointment_booked"]["not_before"]
        <= utcnow() + dt.timedelta(seconds=5)
    )
    assert sent["appointment_booked"]["user_id"] == await user_id(guardian)
    assert sent["appointment_booked"]["push_state"] == "pending"
    assert '"appointment_id"' in sent["appointment_booked"]["params"]
    assert (await row(db, body["id"]))["next_reminder_at"] == start - dt.timedelta(hours=24)
    day_before, quarter = start - dt.timedelta(hours=24), start - dt.timedelta(minutes=15)
    # Each reminder once, when due, to the guardian who booked and to the child.
    me = await user_id(guardian)
    written = await reminders_as_of(
        db,
        body["id"],
        day_before - dt.timedelta(minutes=1),
        day_before,
        day_before + dt.timedelta(hours=1),
        quarter,
        start,
    )
    assert written == [
        [],
        sorted([("appointment_reminder_24h", me), ("appointment_reminder_24h", child)]),
        [],
        sorted([("appointment_reminder_15m", me), ("appointment_reminder_15m", child)]),
        [],
    ]


async def test_a_booking_wakes_the_notification_worker_once_committed(
    settings, db, issuer, fcm_clean, tmp_path
):
    """The booking's statement enqueues its confirmation without a NOTIFY (PostgreSQL serialises
    the commits of transactions that NOTIFY: migration 0011); the API wakes the workers once it
    has committed."""
    settings = pushing_in_process(settings, fcm_clean, tmp_path)
    clinic = await own_clinic(db, HOME)
    async with serve(settings) as http:
        patient = await sign_in(http, issuer)
        token = await insert_device(db, await user_id(patient))
        await asyncio.sleep(0.5)  # the worker's first pass is done; now it waits
        body = await booked(http, patient, clinic, clinic_at(day(3), "08:00"))
        confirmation = await db.fetchval(
            "SELECT id FROM notifications WHERE subject = $1 AND kind = 'appointment_booked'",
            f"appointment:{body['id']}",
        )
        await fcm_clean.wait_for(
            lambda e: str(confirmation) in [r.message["data"]["notification_id"] for r in e.sent_to(token)],
            timeout=10,
        )


async def test_a_reminder_job_that_was_stopped_sends_only_the_latest_reminder(client, db, issuer):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    start = clinic_at(day(3), "10:45")
    body = await booked(client, patient, clinic, start)
    me = await user_id(patient)
    assert await reminders_as_of(db, body["id"], start - dt.timedelta(minutes=10), start) == [
        [("appointment_reminder_15m", me)],
        [],
    ]
    assert await reminders_as_of(db, body["id"], start + dt.timedelta(minutes=1)) == [[]], "the visit began"


async def test_the_housekeeping_job_writes_a_due_reminder(client, db, issuer, pool):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    body = await booked(client, patient, clinic, clinic_at(day(3), "08:00"))
    await visit_is_now(db, body["id"], minutes_from_now=14)
    # The job was due a minute ago (moving the start by hand planned nothing: both times had passed).
    await db.execute(
        "UPDATE appointments SET next_reminder_at = starts_at - interval '15 minutes' WHERE id = $1",
        uuid.UUID(body["id"]),
    )
    assert await remind(pool) >= 1
    written = [(n["kind"], n["user_id"]) for n in await notes(db, body["id"]) if "reminder" in n["kind"]]
    assert written == [("appointment_reminder_15m", await user_id(patient))]
    assert (await row(db, body["id"]))["next_reminder_at"] is None
    await remind(pool)
    assert len([n for n in await notes(db, body["id"]) if "reminder" in n["kind"]]) == 1


async def test_concurrent_reminder_jobs_write_each_reminder_once(client, db, issuer, pool):
    clinic = await own_clinic(db, HOME)
    patient = await sign_in(client, issuer)
    start = clinic_at(day(3), "10:45")
    body = await booked(client, patient, clinic, start)
    subject = f"appointment:{body['id']}"
    jobs = 6
    all_ran = asyncio.Barrier(jobs)

    async def job() -> int:
        """One job's pass, rolled back after every job has run (see reminders_as_of)."""
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                await send_due_reminders(conn, start - dt.timedelta(hours=24))
                mine: int = await conn.fetchval(
                    "SELECT count(*) FROM notifications WHERE subject = $1 AND kind = 'appointment_reminder_24h'",
                    subject,
                )
                await asyncio.wait_for(all_ran.wait(), timeout=30)
                return mine
            finally:
                await transaction.rollback()

    assert sorted(await asyncio.gather(*(job() for _ in range(jobs)))) == [0] * (jobs - 1) + [1]


# --- clinic-day edges and the rate limit ----------------------------------------------------------


async def test_late_evening_and_just_after_midnight_fall_on_their_clinic_days(client, db, issuer):
    """23:30 clinic time is 16:30 UTC the same day; 00:00 the next day is 17:00 UTC *this* day."""
    clinic = await own_clinic(db, HOME, windows=ALL_DAY)
    desk = await staff(client, db, issuer, HOME, "facility_staff")
    evening, midnight = clinic_at(day(3), "23:30"), clinic_at(day(4), "00:00")
    assert midnight.astimezone(dt.UTC).date() == day(3)
    late = await booked(client, await sign_in(client, issuer), clinic, evening)
    early = await booked(client, await sign_in(client, issuer), clinic, midnight.astimezone(dt.UTC))
    assert early["start"] == f"{day(4)}T00:00:00+07:00"
    assert (await row(db, late["id"]))["queue_day"] == day(3)
    assert (await row(db, early["id"]))["queue_day"] == day(4)
    assert (late["queue_number"], early["queue_number"]) == (1, 1), "each clinic day counts from 1"
    on_day_3 = await free(client, clinic, day(3))
    on_day_4 = await free(client, clinic, day(4))
    assert evening not in on_day_3 and clinic_at(day(3), "23:15") in on_day_3
    assert midnight not in on_day_4 and clinic_at(day(4), "00:15") in on_day_4
    assert min(on_day_4) == clinic_at(day(4), "00:15") and max(on_day_3) == clinic_at(day(3), "23:15")

    async def staff_day(on: dt.date) -> set[str]:
        response = await client.get(
            "/v1/staff/appointments",
            params={"date": on.isoformat(), "facility_id": str(clinic.facility_id)},
            headers=desk.headers,
        )
        assert response.status_code == 200, response.text
        return {a["id"] for a in response.json() if a["doctor_id"] == str(clinic.doctor_id)}

    assert await staff_day(day(3)) == {late["id"]}
    assert await staff_day(day(4)) == {early["id"]}


async def test_booking_attempts_are_rate_limited_per_user(database_url, redis_url, issuer, db):
    clinic = await own_clinic(db, HOME, windows=(("08:00", "11:00"),))
    limited = make_settings(database_url, redis_url, issuer, booking_rate_per_minute=3)
    async with serve(limited) as http:
        patient = await sign_in(http, issuer)
        responses = [
            await book(http, patient, clinic, clinic_at(day(3 + i), "08:00")) for i in range(10)
        ]  # a fixed one-minute window: at most two windows' worth (6) can pass, even across a boundary
        refused = [r for r in responses if r.status_code == 429]
        assert len(refused) >= 4
        assert refused[0].json()["code"] == "rate_limited" and int(refused[0].headers["retry-after"]) >= 1
        assert {r.status_code for r in responses} <= {201, 409, 429}
        other = await sign_in(http, issuer)
        assert (await book(http, other, clinic, clinic_at(day(3), "09:00"))).status_code == 201
