"""What booking reuses per process stays exact: availability answers and doctors' schedules are
checked against the versions PostgreSQL keeps (`slot_versions`, migration 0006) before use.

A change shows at once whoever makes it: another process, a direct SQL statement, or time alone (a
hold running out, a slot starting). A booking found against an outdated copy of the schedules is
checked again, never refused or accepted on the strength of the copy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import pytest

from api.app import create_app
from api.booking import availability, queries
from api.clinic_time import CLINIC_TZ
from tests.factories import (
    OwnClinic,
    Session,
    clinic_at,
    clinic_today,
    insert_schedule,
    own_clinic,
    serve,
    sessions_for_many,
)

HOME = "TYT-MUONGPHANG"


def day(offset: int) -> dt.date:
    return clinic_today() + dt.timedelta(days=offset)


async def free(
    http: Any, clinic: OwnClinic, first: dt.date, last: dt.date | None = None
) -> dict[dt.datetime, int]:
    response = await http.get("/v1/availability", params=clinic.availability(first, last))
    assert response.status_code == 200, response.text
    return {dt.datetime.fromisoformat(s["start"]): s["remaining"] for s in response.json()["slots"]}


async def book(
    http: Any, session: Session, clinic: OwnClinic, start: dt.datetime, key: str | None = None, **extra: Any
) -> Any:
    return await http.post(
        "/v1/appointments",
        json=clinic.booking(start, **extra),
        headers={**session.headers, "Idempotency-Key": key or str(uuid.uuid4())},
    )


async def versions(db: Any, doctor_id: uuid.UUID) -> dict[dt.date, int]:
    rows = await db.fetch("SELECT day, version FROM slot_versions WHERE doctor_id = $1", doctor_id)
    return {r["day"]: r["version"] for r in rows}


# --- availability ------------------------------------------------------------------------------


async def test_a_booking_in_one_process_shows_at_once_in_another(settings, db):
    clinic = await own_clinic(db, HOME, windows=(("08:00", "09:00"),))
    target = day(3)
    [patient] = await sessions_for_many(db, settings, 1)
    async with serve(settings) as one, serve(settings) as other:
        assert len(await free(other, clinic, target)) == 4  # the other process has the answer now
        made = await book(one, patient, clinic, clinic_at(target, "08:15"))
        assert made.status_code == 201, made.text
        assert clinic_at(target, "08:15") not in await free(other, clinic, target)
        cancelled = await one.post(f"/v1/appointments/{made.json()['id']}/cancel", headers=patient.headers)
        assert cancelled.status_code == 200, cancelled.text
        assert clinic_at(target, "08:15") in await free(other, clinic, target)


async def test_changes_made_outside_the_app_show_at_once(settings, db):
    clinic = await own_clinic(db, HOME, windows=(("08:00", "09:00"),))
    target = day(4)
    async with serve(settings) as http:
        assert len(await free(http, clinic, target)) == 4
        await db.execute(
            "INSERT INTO schedule_exceptions (schedule_id, day, start_time, end_time) VALUES ($1, $2, '08:00', '08:30')",
            clinic.schedule_id,
            target,
        )
        assert list(await free(http, clinic, target)) == [
            clinic_at(target, "08:30"),
            clinic_at(target, "08:45"),
        ]
        await db.execute("UPDATE services SET duration_minutes = 30 WHERE id = $1", clinic.service_id)
        assert list(await free(http, clinic, target)) == [clinic_at(target, "08:30")]
        await db.execute("UPDATE doctors SET active = false WHERE id = $1", clinic.doctor_id)
        assert await free(http, clinic, target) == {}
        await db.execute("UPDATE doctors SET active = true WHERE id = $1", clinic.doctor_id)
        await insert_schedule(
            db, clinic.facility_id, clinic.doctor_id, clinic.service_id, windows=(("14:00", "14:30"),)
        )
        assert list(await free(http, clinic, target)) == [
            clinic_at(target, "08:30"),
            clinic_at(target, "14:00"),
        ]


async def test_a_hold_running_out_frees_its_slot_without_any_write(settings, db):
    clinic = await own_clinic(db, HOME, windows=(("08:00", "08:30"),), prepaid=True, price=100_000)
    target = day(3)
    [patient] = await sessions_for_many(db, settings, 1)
    async with serve(settings) as http:
        held = await book(http, patient, clinic, clinic_at(target, "08:00"))
        assert held.json()["status"] == "held"
        await db.execute(
            "UPDATE appointments SET hold_expires_at = now() + interval '1 second' WHERE id = $1",
            uuid.UUID(held.json()["id"]),
        )
        assert list(await free(http, clinic, target)) == [clinic_at(target, "08:15")]
        before = await versions(db, clinic.doctor_id)
        await asyncio.sleep(1.2)
        assert list(await free(http, clinic, target)) == [
            clinic_at(target, "08:00"),
            clinic_at(target, "08:15"),
        ]
        assert await versions(db, clinic.doctor_id) == before, "nothing was written: time alone"


async def test_a_slot_that_starts_leaves_the_cached_answer(settings, db):
    now = dt.datetime.now(dt.UTC).astimezone(CLINIC_TZ)
    soon = (now + dt.timedelta(minutes=2)).replace(second=0, microsecond=0)
    if soon.date() != now.date() or soon.hour >= 23:
        pytest.skip("too close to midnight for a slot starting in two minutes")
    start = soon.strftime("%H:%M")
    end = (soon + dt.timedelta(minutes=10)).strftime("%H:%M")
    clinic = await own_clinic(db, HOME, duration=5, windows=((start, end),), release_time=dt.time(0, 0))
    app = create_app(settings)
    async with serve(app) as http:
        assert soon in await free(http, clinic, soon.date())
        cache: availability.AvailabilityCache = app.state.availability
        [answer] = [a for q, a in cache._answers.items() if q.doctor_id == clinic.doctor_id]
        assert answer.valid_until == soon.timestamp(), "valid until the first listed slot begins"


async def test_repeated_requests_reuse_the_answer_and_share_version_reads(settings, db, monkeypatch):
    clinic = await own_clinic(db, HOME, windows=(("08:00", "10:00"),))
    target = day(5)
    computed: list[object] = []
    reads: list[object] = []
    occupancy, read_versions = queries.occupancy_epochs, availability.read_versions

    async def counted_occupancy(*args: Any) -> Any:
        computed.append(args)
        return await occupancy(*args)

    async def counted_reads(*args: Any) -> Any:
        reads.append(args)
        return await read_versions(*args)

    monkeypatch.setattr(queries, "occupancy_epochs", counted_occupancy)
    monkeypatch.setattr(availability, "read_versions", counted_reads)
    [patient] = await sessions_for_many(db, settings, 1)
    async with serve(settings) as http:
        answers = await asyncio.gather(*(free(http, clinic, target) for _ in range(40)))
        assert all(a == answers[0] for a in answers) and len(answers[0]) == 8
        assert len(computed) == 1
        assert len(reads) < 10, "concurrent requests share the version reads"
        for _ in range(3):
            assert await free(http, clinic, target) == answers[0]
        assert len(computed) == 1
        assert (await book(http, patient, clinic, clinic_at(target, "09:00"))).status_code == 201
        assert clinic_at(target, "09:00") not in await free(http, clinic, target)
        assert len(computed) == 2


# --- the schedules a booking is checked against ------------------------------------------------


async def test_bookings_follow_schedule_changes_made_after_the_copy_was_read(settings, db):
    clinic = await own_clinic(db, HOME, windows=(("08:00", "09:00"),))
    target = day(3)
    first, second, third, fourth = await sessions_for_many(db, settings, 4)
    async with serve(settings) as http:
        assert (await book(http, first, clinic, clinic_at(target, "08:00"))).status_code == 201  # copy read
        # A new window: the copy says "not a slot", the database says it is one.
        await insert_schedule(
            db, clinic.facility_id, clinic.doctor_id, clinic.service_id, windows=(("13:00", "13:30"),)
        )
        made = await book(http, second, clinic, clinic_at(target, "13:15"))
        assert made.status_code == 201, made.text
        # Time off: the copy says "a slot", the database refuses it as stale, read again: not a slot.
        await db.execute(
            "INSERT INTO schedule_exceptions (schedule_id, day) VALUES ($1, $2)", clinic.schedule_id, target
        )
        refused = await book(http, third, clinic, clinic_at(target, "08:30"))
        assert (refused.status_code, refused.json()["code"]) == (422, "not_a_slot")
        # A service made prepaid since: the booking is held, with an invoice.
        await db.execute("UPDATE services SET prepayment_required = true WHERE id = $1", clinic.service_id)
        held = await book(http, fourth, clinic, clinic_at(target, "13:00"))
        assert held.status_code == 201, held.text
        assert held.json()["status"] == "held" and held.json()["invoice_id"] is not None


async def test_a_retry_on_its_own_full_slot_replays_and_a_changed_body_is_refused(settings, db):
    clinic = await own_clinic(db, HOME)
    start = clinic_at(day(3), "08:00")
    first, other = await sessions_for_many(db, settings, 2)
    key = str(uuid.uuid4())
    async with serve(settings) as http:
        made = await book(http, first, clinic, start, key=key)
        assert made.status_code == 201
        again = await book(http, first, clinic, start, key=key)  # the slot is full: answered before any lock
        assert (again.status_code, again.headers.get("idempotent-replayed")) == (201, "true")
        assert again.text == made.text
        changed = await book(http, first, clinic, start, key=key, reason="đau đầu")
        assert (changed.status_code, changed.json()["code"]) == (422, "idempotency_key_reused")
        taken = await book(http, other, clinic, start)
        assert (taken.status_code, taken.json()["code"]) == (409, "slot_taken")
        # A key used for a slot that is no longer bookable still replays its first answer.
        await db.execute("UPDATE schedules SET active = false WHERE id = $1", clinic.schedule_id)
        late = await book(http, first, clinic, start, key=key)
        assert (late.status_code, late.text) == (201, made.text)


# --- the versions ------------------------------------------------------------------------------


async def test_every_change_that_moves_free_slots_bumps_a_version(settings, db):
    clinic = await own_clinic(db, HOME, windows=(("08:00", "10:00"),), prepaid=True, price=10_000)
    target, other_day = day(3), day(4)
    [patient] = await sessions_for_many(db, settings, 1)

    async def bumped(change: str, *args: Any) -> set[dt.date]:
        before = await versions(db, clinic.doctor_id)
        await db.execute(change, *args)
        after = await versions(db, clinic.doctor_id)
        return {d for d, v in after.items() if v != before.get(d)}

    async with serve(settings) as http:
        made = (await book(http, patient, clinic, clinic_at(target, "08:00"))).json()
    appointment = uuid.UUID(made["id"])
    schedules = dt.date.min  # asyncpg reads '-infinity' as date.min
    assert target in await versions(db, clinic.doctor_id)
    assert await bumped(
        "UPDATE appointments SET hold_expires_at = now() + interval '1 hour' WHERE id = $1", appointment
    ) == {target}
    assert await bumped("UPDATE appointments SET reason = 'x' WHERE id = $1", appointment) == set()
    moved = clinic_at(other_day, "09:00")
    assert await bumped(
        "UPDATE appointments SET starts_at = $2, ends_at = $2::timestamptz + interval '15 minutes' WHERE id = $1",
        appointment,
        moved,
    ) == {target, other_day}
    assert await bumped("UPDATE appointments SET status = 'cancelled' WHERE id = $1", appointment) == {
        other_day
    }
    assert await bumped("UPDATE appointments SET status = 'expired' WHERE id = $1", appointment) == set()
    assert await bumped("UPDATE schedules SET capacity = 2 WHERE id = $1", clinic.schedule_id) == {schedules}
    assert await bumped(
        "INSERT INTO schedule_exceptions (schedule_id, day) VALUES ($1, $2)", clinic.schedule_id, target
    ) == {schedules}
    assert await bumped("UPDATE services SET duration_minutes = 20 WHERE id = $1", clinic.service_id) == {
        schedules
    }
    assert await bumped("UPDATE services SET name = 'x' WHERE id = $1", clinic.service_id) == set()
    assert await bumped("UPDATE doctors SET active = false WHERE id = $1", clinic.doctor_id) == {schedules}
    assert (
        await bumped("DELETE FROM appointments WHERE id = $1", appointment) == set()
    )  # cancelled: held nothing
