"""The waitlist: when a slot frees up, the longest-waiting patient it suits is offered it.

The offer is a held appointment (held for `WAITLIST_OFFER_MINUTES`) plus a push. Accepting
books it (or, for a prepaid service, starts the usual payment hold). An offer nobody accepts
expires like any hold, and the slot goes to the next entry.
"""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

import notifications
from api.booking import booking, queries, states
from api.booking.models import WaitlistCreate, WaitlistOut
from api.booking.slots import Schedule, Slot, find_slot
from api.clinic_time import clinic_time
from api.errors import ApiError
from api.settings import Settings


def waitlist_out(row: asyncpg.Record, offer: asyncpg.Record | None, now: dt.datetime) -> WaitlistOut:
    return WaitlistOut(
        id=row["id"],
        status=row["status"],
        patient_id=row["patient_id"],
        facility_id=row["facility_id"],
        doctor_id=row["doctor_id"],
        service_id=row["service_id"],
        date_from=row["date_from"],
        date_to=row["date_to"],
        mode=row["mode"],
        offer=booking.appointment_out(offer, now) if offer is not None else None,
    )


async def join(
    conn: asyncpg.Connection, user_id: uuid.UUID, data: WaitlistCreate, now: dt.datetime
) -> WaitlistOut:
    patient_id = data.patient_id or user_id
    if not await queries.cares_for(conn, user_id, patient_id):
        raise ApiError("not_found")
    if data.doctor_id is None and data.service_id is None:
        raise ApiError("validation_failed")
    if (
        data.date_to < data.date_from
        or (data.date_to - data.date_from).days > 60
        or data.date_to < clinic_time(now).date()
    ):
        raise ApiError("invalid_date_range")
    if not await queries.doctor_and_service_at(conn, data.facility_id, data.doctor_id, data.service_id):
        raise ApiError("not_found")
    row = await queries.insert_waitlist_entry(
        conn,
        {
            "patient_id": patient_id,
            "requested_by": user_id,
            "facility_id": data.facility_id,
            "doctor_id": data.doctor_id,
            "service_id": data.service_id,
            "date_from": data.date_from,
            "date_to": data.date_to,
            "mode": data.mode,
        },
    )
    return waitlist_out(row, None, now)


async def offer_freed_slot(
    conn: asyncpg.Connection, settings: Settings, freed: asyncpg.Record, now: dt.datetime
) -> uuid.UUID | None:
    """Offer the slot `freed` (a cancelled or expired appointment) to the first entry it suits.

    Entries whose patient cannot take it (already busy then, or at their limit) are passed over.
    Returns the held offer's appointment id, if one was made.
    """
    if freed["starts_at"] <= now:
        return None
    schedules, exceptions = await queries.bookable_schedules(
        conn,
        doctor_id=freed["doctor_id"],
        facility_id=None,
        service_id=freed["service_id"],
        date_from=clinic_time(freed["starts_at"]).date(),
        date_to=clinic_time(freed["starts_at"]).date(),
    )
    schedule = next((s for s in schedules if s.id == freed["schedule_id"]), None)
    if schedule is None:
        return None
    slot = find_slot(schedule, exceptions.get(schedule.id, []), freed["starts_at"])
    if slot is None:
        return None
    passed_over: list[uuid.UUID] = []
    while (
        entry := await queries.next_waiting(
            conn,
            schedule.facility_id,
            schedule.doctor_id,
            schedule.service_id,
            clinic_time(slot.start).date(),
            sorted(schedule.modes),
            passed_over,
        )
    ) is not None:
        try:
            async with conn.transaction():  # a savepoint: a patient who cannot take it changes nothing
                offer = await _hold_for(conn, settings, schedule, slot, entry, now)
        except ApiError as refusal:
            if refusal.code == "slot_taken":
                return None  # someone booked it first: nothing left to offer
            passed_over.append(entry["id"])
            continue
        return offer
    return None


async def _hold_for(
    conn: asyncpg.Connection,
    settings: Settings,
    schedule: Schedule,
    slot: Slot,
    entry: asyncpg.Record,
    now: dt.datetime,
) -> uuid.UUID:
    await booking.check_patient_limits(conn, settings, entry["patient_id"], schedule.facility_id, slot)
    mode = entry["mode"] or sorted(schedule.modes)[0]
    row = await booking.take_place(
        conn,
        schedule,
        slot,
        entry["patient_id"],
        {
            "patient_id": entry["patient_id"],
            "booked_by": entry["requested_by"],
            "facility_id": schedule.facility_id,
            "doctor_id": schedule.doctor_id,
            "service_id": schedule.service_id,
            "schedule_id": schedule.id,
            "starts_at": slot.start,
            "ends_at": slot.end,
            "mode": mode,
            "status": "held",
            "hold_expires_at": now + dt.timedelta(minutes=settings.waitlist_offer_minutes),
            "invoice_id": None,
            "reason": None,
        },
    )
    await queries.set_waitlist_status(conn, entry["id"], "offered", row["id"])
    for recipient in dict.fromkeys((entry["requested_by"], entry["patient_id"])):
        await notifications.enqueue(
            conn,
            recipient,
            "waitlist_offer",
            {
                "waitlist_entry_id": entry["id"],
                "appointment_id": row["id"],
                "start": slot.start,
                "expires_at": row["hold_expires_at"],
            },
            dedupe_key=f"waitlist:{entry['id']}:offer:{row['id']}:{recipient}",
            facility_id=schedule.facility_id,
            subject=f"appointment:{row['id']}",
        )
    offer_id: uuid.UUID = row["id"]
    return offer_id


async def accept(
    conn: asyncpg.Connection, settings: Settings, user_id: uuid.UUID, entry_id: uuid.UUID, now: dt.datetime
) -> WaitlistOut:
    entry = await queries.waitlist_entry_for(conn, user_id, entry_id)
    if entry is None:
        raise ApiError("not_found")
    if entry["status"] != "offered":
        raise ApiError("invalid_transition")
    offer = await queries.get_appointment(conn, entry["offer_appointment_id"], lock=True)
    assert offer is not None
    if offer["status"] != "held" or offer["hold_expires_at"] <= now:
        raise ApiError("hold_expired")
    terms = await queries.service_terms(conn, offer["service_id"])
    assert terms is not None
    if terms["prepayment_required"]:
        invoice_id = await queries.insert_invoice(
            conn, offer["patient_id"], offer["facility_id"], offer["service_id"]
        )
        await conn.execute("UPDATE appointments SET invoice_id = $2 WHERE id = $1", offer["id"], invoice_id)
        offer = await queries.renew_hold(
            conn, offer["id"], now + dt.timedelta(minutes=settings.booking_hold_minutes)
        )
    else:
        offer = await booking.confirm(conn, offer)
    entry = await queries.set_waitlist_status(conn, entry["id"], "accepted", offer["id"])
    return waitlist_out(entry, offer, now)


async def leave(
    conn: asyncpg.Connection, settings: Settings, user_id: uuid.UUID, entry_id: uuid.UUID, now: dt.datetime
) -> None:
    """Leave the waitlist. A slot held for the entry is let go and offered to the next one."""
    entry = await queries.waitlist_entry_for(conn, user_id, entry_id)
    if entry is None or entry["status"] not in ("waiting", "offered"):
        raise ApiError("not_found")
    if entry["status"] == "offered":
        offer = await queries.get_appointment(conn, entry["offer_appointment_id"], lock=True)
        if offer is not None and offer["status"] == "held":
            await queries.set_status(
                conn, offer["id"], "cancelled", states.sources("cancelled"), cancelled_at=True
            )
            await notifications.cancel_pending(conn, f"appointment:{offer['id']}")
            await offer_freed_slot(conn, settings, offer, now)
    await queries.set_waitlist_status(conn, entry["id"], "cancelled", entry["offer_appointment_id"])
