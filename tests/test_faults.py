"""Faults on one machine: a PostgreSQL backend killed in the middle of a request's transaction.

The request that lost its connection answers 503 with `Retry-After` (never a 500), nothing it
wrote before the kill is kept, the pool hands out working connections afterwards, and the
client's retry with the same Idempotency-Key gives exactly one result.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import asyncpg

from api.clinic_time import CLINIC_TZ
from tests.factories import clinic_at, clinic_today, own_clinic, serve, sessions_for_many


async def blocked_backend(db: Any, waiting_on: str) -> int:
    """The app's backend that is waiting for a lock, in a statement that mentions `waiting_on`."""
    for _ in range(200):
        pid = await db.fetchval(
            """SELECT pid FROM pg_stat_activity
                WHERE datname = current_database() AND application_name = 'telehealth'
                  AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'""",
            waiting_on,
        )
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.02)
    raise AssertionError(f"no request blocked on {waiting_on}")


async def test_a_backend_killed_mid_booking_writes_nothing_and_the_retry_books_once(
    db, settings, database_url
):
    clinic = await own_clinic(db, "PK-BINHAN")
    patient = (await sessions_for_many(db, settings, 1))[0]
    start = clinic_at(clinic_today() + dt.timedelta(days=3), "08:00")
    headers = {**patient.headers, "Idempotency-Key": str(uuid.uuid4())}
    # The booking (one statement, book_appointment) takes the day's queue number under the counter's
    # row lock: holding that row keeps the request waiting there until its backend is killed.
    await db.execute(
        "INSERT INTO queue_counters (doctor_id, day, last_number) VALUES ($1, $2, 0)",
        clinic.doctor_id,
        start.astimezone(CLINIC_TZ).date(),
    )
    blocker = await asyncpg.connect(database_url)
    try:
        async with serve(settings) as http:
            async with blocker.transaction():
                await blocker.execute(
                    "SELECT 1 FROM queue_counters WHERE doctor_id = $1 FOR UPDATE", clinic.doctor_id
                )
                booking = asyncio.create_task(
                    http.post("/v1/appointments", json=clinic.booking(start), headers=headers)
                )
                killed = await blocked_backend(db, "book_appointment")
                assert await db.fetchval("SELECT pg_terminate_backend($1)", killed)
                lost = await booking
            assert lost.status_code == 503, lost.text
            assert lost.json()["code"] == "service_unavailable" and lost.headers["retry-after"] == "1"
            patient_id = uuid.UUID(patient.user["id"])
            assert (
                await db.fetchval("SELECT count(*) FROM appointments WHERE patient_id = $1", patient_id) == 0
            )
            assert await db.fetchval("SELECT count(*) FROM notifications WHERE user_id = $1", patient_id) == 0

            retried = await http.post("/v1/appointments", json=clinic.booking(start), headers=headers)
            assert retried.status_code == 201, retried.text
            again = await http.post("/v1/appointments", json=clinic.booking(start), headers=headers)
            assert (again.status_code, again.headers.get("idempotent-replayed")) == (201, "true")
            assert again.json()["id"] == retried.json()["id"]
            assert retried.json()["queue_number"] == 1
            assert (
                await db.fetchval("SELECT count(*) FROM appointments WHERE patient_id = $1", patient_id) == 1
            )
    finally:
        await blocker.close()
