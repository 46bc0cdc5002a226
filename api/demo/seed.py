"""`telehealth seed`: load the Điện Biên demo directory. Idempotent (upserts on stable codes)."""

from __future__ import annotations

import json

import asyncpg

from api.booking import queries as booking_queries
from api.demo.dien_bien import DOCTORS, FACILITIES, SCHEDULES, STAFF
from api.directory import queries


async def seed(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            ids = {}
            services = 0
            for facility in FACILITIES:
                values = {**facility, "opening_hours": json.dumps(facility["opening_hours"]), "is_demo": True}
                ids[facility["code"]] = await queries.upsert_facility(conn, values)
                for service in facility["services"]:
                    await queries.insert_service(conn, ids[facility["code"]], service)
                    services += 1
            for facility_code, code, name, title, specialties, languages, video, personal_id in DOCTORS:
                await queries.insert_doctor(
                    conn,
                    ids[facility_code],
                    {
                        "code": code,
                        "name": name,
                        "title": title,
                        "specialties": specialties,
                        "languages": languages,
                        "video": video,
                        "personal_id": personal_id,
                    },
                )
            for personal_id, facility_code, role in STAFF:
                await queries.add_staff(conn, ids[facility_code], personal_id, role)
            for facility_code, doctor_code, service_code, weekly, modes, capacity in SCHEDULES:
                await booking_queries.ensure_schedule(
                    conn, ids[facility_code], doctor_code, service_code, weekly, modes, capacity
                )
    finally:
        await conn.close()
    return {
        "facilities": len(FACILITIES),
        "services": services,
        "doctors": len(DOCTORS),
        "staff": len(STAFF),
        "schedules": len(SCHEDULES),
    }
