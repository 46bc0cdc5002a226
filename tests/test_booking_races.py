"""Booking under real concurrency: requests overlap in one event loop through `serve(settings)`
(its own app and pool), so PostgreSQL, not the test's ordering, decides who wins.

Patients here are made with `sessions_for_many` (a user row, a session and the access token
sign-in would issue), because 200 sign-ins through the API would take most of the time budget.

Also the lifecycle that background work drives: holds running out (read as expired at once,
expired inline by the next booking, swept by housekeeping) and the waitlist's offers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

from api.booking import booking, queries
from api.booking.housekeeping import expire_and_offer
from api.errors import ApiError
from tests.factories import (
    OwnClinic,
    Session,
    clinic_at,
    clinic_today,
    own_clinic,
    serve,
    sessions_for_many,
    sign_in,
)

RACES = "TYT-MUONGPHANG"  # the demo facility this file's clinics are at


def day(offset: int) -> dt.date:
    return clinic_today() + dt.timedelta(days=offset)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def book(
    http: Any,
    session: Session,
    clinic: OwnClinic,
    start: dt.datetime,
    *,
    key: str | None = None,
    **extra: Any,
) -> Any:
    return await http.post(
        "/v1/appointments",
        json=clinic.booking(start, **extra),
        headers={**session.headers, "Idempotency-Key": key or str(uuid.uuid4())},
    )


async def booked(
    http: Any, session: Session, clinic: OwnClinic, start: dt.datetime, **extra: Any
) -> dict[str, Any]:
    response = await book(http, session, clinic, start, **extra)
    assert response.status_code == 201, response.text
    return response.json()


async def free(http: Any, clinic: OwnClinic, on: dt.date) -> dict[dt.datetime, int]:
    response = await http.get("/v1/availability", params=clinic.availability(on))
    assert response.status_code == 200, response.text
    return {dt.datetime.fromisoformat(s["start"]): s["remaining"] for s in response.json()["slots"]}


def codes(responses: Sequence[Any]) -> Counter[tuple[int, str | None]]:
    """(status, problem code) of each response; no 5xx ever."""
    assert all(r.status_code < 500 for r in responses), [r.text for r in responses if r.status_code >= 500]
    return Counter((r.status_code, r.json().get("code") if r.status_code >= 400 else None) for r in responses)


async def holding(db: Any, clinic: OwnClinic) -> list[Any]:
    return await db.fetch(
        """SELECT * FROM appointments WHERE doctor_id = $1 AND status IN ('held', 'booked', 'checked_in', 'completed')
            ORDER BY starts_at, seat""",
        clinic.doctor_id,
    )


async def expire_now(db: Any, appointment_id: Any) -> None:
    await db.execute(
        "UPDATE appointments SET hold_expires_at = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(str(appointment_id)),
    )


# --- many patients, one slot ---------------------------------------------------------------------


async def test_200_patients_racing_for_one_place_leave_one_booking(settings, db):
    clinic = await own_clinic(db, RACES)
    start = clinic_at(day(3), "08:00")
    async with serve(settings) as http:
        patients = await sessions_for_many(db, settings, 200)
        responses = await asyncio.gather(*(book(http, p, clinic, start) for p in patients))
        assert codes(responses) == {(201, None): 1, (409, "slot_taken"): 199}
        assert start not in await free(http, clinic, day(3))
    winner = next(r.json() for r in responses if r.status_code == 201)
    rows = await db.fetch("SELECT * FROM appointments WHERE doctor_id = $1", clinic.doctor_id)
    assert [(str(r["id"]), r["status"], r["seat"], r["queue_number"]) for r in rows] == [
        (winner["id"], "booked", 1, 1)
    ]
    assert (
        await db.fetchval("SELECT last_number FROM queue_counters WHERE doctor_id = $1", clinic.doctor_id)
        == 1
    )


async def test_200_patients_racing_for_five_places_leave_five_bookings(settings, db):
    clinic = await own_clinic(db, RACES, capacity=5, price=0)
    start = clinic_at(day(3), "08:00")
    async with serve(settings) as http:
        patients = await sessions_for_many(db, settings, 200)
        responses = await asyncio.gather(*(book(http, p, clinic, start) for p in patients))
        assert codes(responses) == {(201, None): 5, (409, "slot_taken"): 195}
        assert start not in await free(http, clinic, day(3))
    rows = await holding(db, clinic)
    assert sorted(r["seat"] for r in rows) == [1, 2, 3, 4, 5]
    assert sorted(r["queue_number"] for r in rows) == [1, 2, 3, 4, 5]
    assert len({r["patient_id"] for r in rows}) == 5
    assert {str(r["id"]) for r in rows} == {r.json()["id"] for r in responses if r.status_code == 201}


# --- reschedule against a new booking --------------------------------------------------------------


async def reschedule(http: Any, session: Session, appointment_id: str, start: dt.datetime) -> Any:
    return await http.post(
        f"/v1/appointments/{appointment_id}/reschedule",
        json={"start": start.isoformat()},
        headers=session.headers,
    )


async def race_move_against_booking(
    http: Any, db: Any, settings: Any, clinic: OwnClinic, on: dt.date, *, booking_first: bool
) -> tuple[Any, Any]:
    """A patient moves their 08:00 visit to 10:00 while another books 10:00; checks what must hold
    whoever wins: one holder of 10:00, and a loser left exactly as before. Returns (move, booking)."""
    mover, newcomer = await sessions_for_many(db, settings, 2)
    old, target = clinic_at(on, "08:00"), clinic_at(on, "10:00")
    mine = await booked(http, mover, clinic, old)
    before = await db.fetchrow("SELECT * FROM appointments WHERE id = $1", uuid.UUID(mine["id"]))
    racers = [reschedule(http, mover, mine["id"], target), book(http, newcomer, clinic, target)]
    if booking_first:
        moved, new = reversed(await asyncio.gather(*reversed(racers)))
    else:
        moved, new = await asyncio.gather(*racers)
    after = await db.fetchrow("SELECT * FROM appointments WHERE id = $1", uuid.UUID(mine["id"]))
    at_target = [r for r in await holding(db, clinic) if r["starts_at"] == target]
    assert len(at_target) == 1, "exactly one holds the slot"
    if moved.status_code == 200:
        assert new.status_code >= 400, new.text
        assert at_target[0]["id"] == after["id"] and after["starts_at"] == target
        assert old in await free(http, clinic, on), "the old slot is free again"
        assert (
            await db.fetchval(
                "SELECT count(*) FROM appointments WHERE patient_id = $1", uuid.UUID(newcomer.user["id"])
            )
            == 0
        )
    else:
        assert moved.status_code >= 400 and new.status_code == 201, [moved.text, new.text]
        assert after == before, "the loser is unchanged"
        assert str(at_target[0]["id"]) == new.json()["id"]
        assert old not in await free(http, clinic, on)
    return moved, new


async def test_a_reschedule_and_a_booking_racing_for_one_slot_leave_one_holder(settings, db):
    clinic = await own_clinic(db, RACES, windows=(("08:00", "11:00"),))
    async with serve(settings) as http:
        for round_ in range(6):
            moved, new = await race_move_against_booking(
                http, db, settings, clinic, day(3 + round_), booking_first=round_ % 2 == 1
            )
            # Either may win; the loser's answer is checked in the next test.
            assert sorted([moved.status_code, new.status_code])[0] in (200, 201)


async def test_racing_for_one_slot_the_loser_is_told_slot_taken(settings, db):
    """The deadlock needs both statements inside PostgreSQL at once, so it takes a few rounds to
    appear; each round is cheap. Fails at the first round that answers 5xx."""
    clinic = await own_clinic(db, RACES, windows=(("08:00", "11:00"),), horizon_days=60)
    async with serve(settings) as http:
        for round_ in range(24):
            moved, new = await race_move_against_booking(
                http, db, settings, clinic, day(3 + round_), booking_first=True
            )
            assert codes([moved, new])[(409, "slot_taken")] == 1
            # Two patients moving into the same free slot.
            first, second = await sessions_for_many(db, settings, 2)
            on = day(3 + round_)
            mine = [
                await booked(http, p, clinic, clinic_at(on, hhmm))
                for p, hhmm in ((first, "08:30"), (second, "08:45"))
            ]
            target = clinic_at(on, "10:30")
            moves = await asyncio.gather(
                reschedule(http, first, mine[0]["id"], target),
                reschedule(http, second, mine[1]["id"], target),
            )
            assert sorted(codes(moves)) == [(200, None), (409, "slot_taken")]


# --- a hold running out while its payment is confirmed --------------------------------------------


async def confirm_payment(pool: Any, appointment_id: uuid.UUID) -> str:
    """What payments will do when a payment succeeds: lock the appointment, then confirm it."""
    await asyncio.sleep(random.random() / 200)
    try:
        async with pool.acquire() as conn, conn.transaction():
            row = await queries.get_appointment(conn, appointment_id, lock=True)
            assert row is not None
            await booking.confirm(conn, row)
    except ApiError as refusal:
        assert refusal.code == "invalid_transition"
        return "refused"
    return "confirmed"


async def sweep(pool: Any, settings: Any) -> None:
    await asyncio.sleep(random.random() / 200)
    await expire_and_offer(pool, settings)


async def test_a_hold_expiring_while_its_payment_confirms_has_one_outcome(settings, db, pool):
    clinic = await own_clinic(db, RACES, prepaid=True, price=100_000, windows=(("08:00", "11:00"),))
    outcomes: Counter[str] = Counter()
    async with serve(settings) as http:
        patients = await sessions_for_many(db, settings, 10)
        for i, patient in enumerate(patients):
            held = await booked(
                http, patient, clinic, clinic_at(day(3), "08:00") + dt.timedelta(minutes=15 * i)
            )
            assert held["status"] == "held"
            await expire_now(db, held["id"])
            appointment_id = uuid.UUID(held["id"])
            payment, _ = await asyncio.gather(confirm_payment(pool, appointment_id), sweep(pool, settings))
            stored = await db.fetchrow("SELECT * FROM appointments WHERE id = $1", appointment_id)
            invoice = await db.fetchval("SELECT status FROM invoices WHERE id = $1", stored["invoice_id"])
            got = (await http.get(f"/v1/appointments/{held['id']}", headers=patient.headers)).json()
            outcomes[payment] += 1
            if payment == "confirmed":
                assert (stored["status"], invoice, got["status"]) == ("booked", "pending", "booked")
                assert stored["queue_number"] is not None
            else:
                assert (stored["status"], invoice, got["status"]) == ("expired", "void", "expired")
                assert stored["queue_number"] is None
                kinds = await db.fetch(
                    "SELECT kind FROM notifications WHERE subject = $1 AND kind = 'appointment_booked'",
                    f"appointment:{appointment_id}",
                )
                assert kinds == []
    assert sum(outcomes.values()) == 10


# --- Idempotency-Key racing itself ------------------------------------------------------------------


async def test_ten_concurrent_retries_with_one_key_make_one_appointment(settings, db, issuer):
    clinic = await own_clinic(db, RACES)
    start = clinic_at(day(3), "08:00")
    key = str(uuid.uuid4())
    async with serve(settings) as http:
        patient = await sign_in(http, issuer)
        responses = await asyncio.gather(*(book(http, patient, clinic, start, key=key) for _ in range(10)))
    assert codes(responses) == {(201, None): 10}
    assert len({r.text for r in responses}) == 1, "every answer is the first one"
    assert sorted(r.headers.get("idempotent-replayed", "") for r in responses) == [""] + ["true"] * 9
    assert await db.fetchval("SELECT count(*) FROM appointments WHERE doctor_id = $1", clinic.doctor_id) == 1


# --- queue numbers ---------------------------------------------------------------------------------


async def test_queue_numbers_are_unique_and_gap_free_under_concurrency(settings, db):
    clinic = await own_clinic(db, RACES, windows=(("07:00", "12:00"),))  # 20 slots
    starts = [clinic_at(day(3), "07:00") + dt.timedelta(minutes=15 * i) for i in range(20)]
    async with serve(settings) as http:
        patients = await sessions_for_many(db, settings, 30)
        # 20 take a slot each; 10 more race some of them and lose, rolling back.
        wanted = starts + random.sample(starts, 10)
        responses = await asyncio.gather(
            *(book(http, p, clinic, s) for p, s in zip(patients, wanted, strict=True))
        )
    assert codes(responses) == {(201, None): 20, (409, "slot_taken"): 10}
    rows = await holding(db, clinic)
    assert sorted(r["queue_number"] for r in rows) == list(range(1, 21))
    assert {r["queue_day"] for r in rows} == {day(3)}
    assert sorted(r.json()["queue_number"] for r in responses if r.status_code == 201) == list(range(1, 21))


# --- a hold running out ------------------------------------------------------------------------------


async def test_an_expired_hold_frees_its_slot_for_the_next_patient(settings, db):
    clinic = await own_clinic(db, RACES, prepaid=True, price=90_000)
    start = clinic_at(day(3), "08:00")
    async with serve(settings) as http:
        first, second = await sessions_for_many(db, settings, 2)
        held = await booked(http, first, clinic, start)
        problem = await book(http, second, clinic, start)
        assert problem.status_code == 409 and problem.json()["code"] == "slot_taken"
        await expire_now(db, held["id"])

        got = await http.get(f"/v1/appointments/{held['id']}", headers=first.headers)
        assert got.json()["status"] == "expired"
        assert start in await free(http, clinic, day(3))
        cancel = await http.post(f"/v1/appointments/{held['id']}/cancel", headers=first.headers)
        assert cancel.status_code == 409 and cancel.json()["code"] == "invalid_transition"

        taken = await booked(http, second, clinic, start)
        assert taken["status"] == "held" and taken["id"] != held["id"]
        assert start not in await free(http, clinic, day(3))
    stale = await db.fetchrow(
        "SELECT status, invoice_id FROM appointments WHERE id = $1", uuid.UUID(held["id"])
    )
    assert stale["status"] == "expired", "expired inline by the booking that took its place"
    assert await db.fetchval("SELECT status FROM invoices WHERE id = $1", stale["invoice_id"]) == "void"
    assert (
        await db.fetchval("SELECT status FROM invoices WHERE id = $1", uuid.UUID(taken["invoice_id"]))
        == "pending"
    )


async def test_housekeeping_expires_due_holds_and_voids_their_invoices(settings, db, pool):
    clinic = await own_clinic(db, RACES, prepaid=True, price=90_000)
    async with serve(settings) as http:
        due, live = await sessions_for_many(db, settings, 2)
        stale = await booked(http, due, clinic, clinic_at(day(3), "08:00"))
        fresh = await booked(http, live, clinic, clinic_at(day(3), "08:15"))
        await expire_now(db, stale["id"])
        assert await expire_and_offer(pool, settings) >= 1
    statuses = {
        str(r["id"]): (r["status"], r["invoice"])
        for r in await db.fetch(
            """SELECT a.id, a.status, i.status AS invoice FROM appointments a JOIN invoices i ON i.id = a.invoice_id
                WHERE a.doctor_id = $1""",
            clinic.doctor_id,
        )
    }
    assert statuses == {stale["id"]: ("expired", "void"), fresh["id"]: ("held", "pending")}


# --- the waitlist ------------------------------------------------------------------------------------


async def join(
    http: Any, session: Session, clinic: OwnClinic, first: dt.date, last: dt.date
) -> dict[str, Any]:
    response = await http.post(
        "/v1/waitlist",
        json={
            "facility_id": str(clinic.facility_id),
            "doctor_id": str(clinic.doctor_id),
            "service_id": str(clinic.service_id),
            "date_from": first.isoformat(),
            "date_to": last.isoformat(),
        },
        headers={**session.headers, "Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "waiting" and body["offer"] is None
    return body


async def entry_of(http: Any, session: Session, entry_id: str) -> dict[str, Any]:
    entries = (await http.get("/v1/waitlist", headers=session.headers)).json()
    return next(e for e in entries if e["id"] == entry_id)


async def offers_to(db: Any, user_id: str) -> list[Any]:
    return await db.fetch(
        "SELECT params FROM notifications WHERE user_id = $1 AND kind = 'waitlist_offer'", uuid.UUID(user_id)
    )


async def test_a_cancelled_slot_is_offered_to_the_first_waiting_patient_who_accepts(settings, db):
    clinic = await own_clinic(db, RACES, windows=(("08:00", "08:30"),))
    target = day(4)
    async with serve(settings) as http:
        holder, waiting, later, other_day = await sessions_for_many(db, settings, 4)
        taken = [await booked(http, holder, clinic, clinic_at(target, hhmm)) for hhmm in ("08:00", "08:15")]
        await join(http, other_day, clinic, day(6), day(8))  # waits for other days: not offered
        entry = await join(http, waiting, clinic, day(3), day(5))
        second = await join(http, later, clinic, target, target)

        cancel = await http.post(f"/v1/appointments/{taken[1]['id']}/cancel", headers=holder.headers)
        assert cancel.status_code == 200, cancel.text

        offered = await entry_of(http, waiting, entry["id"])
        assert offered["status"] == "offered"
        offer = offered["offer"]
        assert offer["status"] == "held" and offer["patient_id"] == waiting.user["id"]
        assert dt.datetime.fromisoformat(offer["start"]) == clinic_at(target, "08:15")
        assert dt.datetime.fromisoformat(offer["hold_expires_at"]) > utcnow() + dt.timedelta(minutes=10)
        assert (await entry_of(http, later, second["id"]))["status"] == "waiting"
        assert await free(http, clinic, target) == {}, "the offer holds the slot"
        notified = await offers_to(db, waiting.user["id"])
        assert len(notified) == 1 and offer["id"] in notified[0]["params"]

        accepted = await http.post(f"/v1/waitlist/{entry['id']}/accept", headers=waiting.headers)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["status"] == "accepted"
        assert accepted.json()["offer"]["status"] == "booked"
        visit = await http.get(f"/v1/appointments/{offer['id']}", headers=waiting.headers)
        assert visit.json()["status"] == "booked" and visit.json()["queue_number"] == 3
        again = await http.post(f"/v1/waitlist/{entry['id']}/accept", headers=waiting.headers)
        assert again.status_code == 409 and again.json()["code"] == "invalid_transition"
    kinds = {
        r["kind"]
        for r in await db.fetch(
            "SELECT kind FROM notifications WHERE subject = $1", f"appointment:{offer['id']}"
        )
    }
    assert {"waitlist_offer", "appointment_booked"} <= kinds
    reminder = await db.fetchval(
        "SELECT next_reminder_at FROM appointments WHERE id = $1", uuid.UUID(offer["id"])
    )
    assert reminder is not None, "a booked visit plans its reminders"


async def test_an_unanswered_offer_lapses_and_passes_to_the_next_entry(settings, db, pool):
    clinic = await own_clinic(db, RACES, windows=(("08:00", "08:15"),))
    target = day(4)
    async with serve(settings) as http:
        holder, first, second = await sessions_for_many(db, settings, 3)
        taken = await booked(http, holder, clinic, clinic_at(target, "08:00"))
        first_entry = await join(http, first, clinic, target, target)
        second_entry = await join(http, second, clinic, target, target)
        await http.post(f"/v1/appointments/{taken['id']}/cancel", headers=holder.headers)
        first_offer = (await entry_of(http, first, first_entry["id"]))["offer"]
        assert first_offer is not None

        await expire_now(db, first_offer["id"])
        too_late = await http.post(f"/v1/waitlist/{first_entry['id']}/accept", headers=first.headers)
        assert too_late.status_code == 409 and too_late.json()["code"] == "hold_expired"
        await expire_and_offer(pool, settings)

        assert (await entry_of(http, first, first_entry["id"]))["status"] == "lapsed"
        late = await http.post(f"/v1/waitlist/{first_entry['id']}/accept", headers=first.headers)
        assert late.status_code == 409 and late.json()["code"] == "invalid_transition"
        passed_on = await entry_of(http, second, second_entry["id"])
        assert passed_on["status"] == "offered"
        assert passed_on["offer"]["id"] != first_offer["id"]
        assert passed_on["offer"]["start"] == first_offer["start"]
        assert len(await offers_to(db, second.user["id"])) == 1
        accepted = await http.post(f"/v1/waitlist/{second_entry['id']}/accept", headers=second.headers)
        assert accepted.status_code == 200 and accepted.json()["offer"]["status"] == "booked"
    assert (
        await db.fetchval("SELECT status FROM appointments WHERE id = $1", uuid.UUID(first_offer["id"]))
        == "expired"
    )
    assert [r["patient_id"] for r in await holding(db, clinic)] == [uuid.UUID(second.user["id"])]


async def test_an_offer_expired_inline_by_the_next_booking_lapses(settings, db):
    clinic = await own_clinic(db, RACES, windows=(("08:00", "08:15"),))
    target = day(4)
    async with serve(settings) as http:
        holder, waiting, newcomer = await sessions_for_many(db, settings, 3)
        taken = await booked(http, holder, clinic, clinic_at(target, "08:00"))
        entry = await join(http, waiting, clinic, target, target)
        await http.post(f"/v1/appointments/{taken['id']}/cancel", headers=holder.headers)
        offer = (await entry_of(http, waiting, entry["id"]))["offer"]
        await expire_now(db, offer["id"])
        # Before any housekeeping pass, someone books the slot: the stale offer is expired inline.
        await booked(http, newcomer, clinic, clinic_at(target, "08:00"))
        assert (
            await db.fetchval("SELECT status FROM appointments WHERE id = $1", uuid.UUID(offer["id"]))
            == "expired"
        )
        assert (await entry_of(http, waiting, entry["id"]))["status"] == "lapsed"


async def test_turning_down_an_offer_by_cancelling_it_ends_the_offer(settings, db):
    clinic = await own_clinic(db, RACES, windows=(("08:00", "08:15"),))
    target = day(4)
    async with serve(settings) as http:
        holder, waiting, next_in_line = await sessions_for_many(db, settings, 3)
        taken = await booked(http, holder, clinic, clinic_at(target, "08:00"))
        entry = await join(http, waiting, clinic, target, target)
        second = await join(http, next_in_line, clinic, target, target)
        await http.post(f"/v1/appointments/{taken['id']}/cancel", headers=holder.headers)
        offer = (await entry_of(http, waiting, entry["id"]))["offer"]
        declined = await http.post(f"/v1/appointments/{offer['id']}/cancel", headers=waiting.headers)
        assert declined.status_code == 200 and declined.json()["status"] == "cancelled"
        # The slot goes on to the next entry at once ...
        assert (await entry_of(http, next_in_line, second["id"]))["status"] == "offered"
        # ... and the first entry is no longer offered anything.
        assert (await entry_of(http, waiting, entry["id"]))["status"] in ("lapsed", "cancelled")


async def test_leaving_the_waitlist_while_offered_passes_the_slot_on(settings, db):
    clinic = await own_clinic(db, RACES, windows=(("08:00", "08:15"),))
    target = day(4)
    async with serve(settings) as http:
        holder, first, second = await sessions_for_many(db, settings, 3)
        taken = await booked(http, holder, clinic, clinic_at(target, "08:00"))
        entry = await join(http, first, clinic, target, target)
        next_entry = await join(http, second, clinic, target, target)
        missing_key = await http.post(
            "/v1/waitlist",
            json={
                "facility_id": str(clinic.facility_id),
                "doctor_id": str(clinic.doctor_id),
                "date_from": target.isoformat(),
                "date_to": target.isoformat(),
            },
            headers=first.headers,
        )
        assert missing_key.status_code == 400 and missing_key.json()["code"] == "idempotency_key_required"

        await http.post(f"/v1/appointments/{taken['id']}/cancel", headers=holder.headers)
        offer = (await entry_of(http, first, entry["id"]))["offer"]
        left = await http.delete(f"/v1/waitlist/{entry['id']}", headers=first.headers)
        assert left.status_code == 204, left.text
        assert (await entry_of(http, first, entry["id"]))["status"] == "cancelled"
        assert (await http.get(f"/v1/appointments/{offer['id']}", headers=first.headers)).json()[
            "status"
        ] == "cancelled"
        passed_on = await entry_of(http, second, next_entry["id"])
        assert passed_on["status"] == "offered"
        assert dt.datetime.fromisoformat(passed_on["offer"]["start"]) == clinic_at(target, "08:00")
        again = await http.delete(f"/v1/waitlist/{entry['id']}", headers=first.headers)
        assert again.status_code == 404
        stranger = await http.delete(f"/v1/waitlist/{next_entry['id']}", headers=holder.headers)
        assert stranger.status_code == 404
