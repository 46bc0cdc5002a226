"""SQL of the directory domain. Searches compare `fold_text` forms: case and diacritics ignored."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from api.pagination import like_pattern

_FACILITY = """id, code, name, kind, district, address, phone, latitude, longitude, opening_hours, is_demo"""
_SERVICE = (
    """id, facility_id, code, name, duration_minutes, price_vnd, video_offered, prepayment_required, active"""
)
_DOCTOR = """d.id, d.facility_id, f.name AS facility_name, d.code, d.full_name, d.title, d.specialties,
             d.languages, d.video, d.active"""


async def list_facilities(
    conn: asyncpg.Connection,
    *,
    q: str | None,
    kind: str | None,
    district: str | None,
    after: tuple[str, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""SELECT {_FACILITY} FROM facilities
             WHERE ($1::text IS NULL OR search_text LIKE fold_text($1))
               AND ($2::text IS NULL OR kind = $2)
               AND ($3::text IS NULL OR district_key = fold_text($3))
               AND ($4::text IS NULL OR (name, id) > ($4, $5::uuid))
             ORDER BY name, id LIMIT $6""",
        like_pattern(q) if q else None,
        kind,
        district,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )


async def get_facility(conn: asyncpg.Connection, facility_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_FACILITY} FROM facilities WHERE id = $1", facility_id)


async def facility_exists(conn: asyncpg.Connection, facility_id: uuid.UUID) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM facilities WHERE id = $1", facility_id))


async def list_services(
    conn: asyncpg.Connection,
    facility_id: uuid.UUID,
    *,
    include_inactive: bool,
    after: tuple[str, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""SELECT {_SERVICE} FROM services
             WHERE facility_id = $1 AND (active OR $2)
               AND ($3::text IS NULL OR (name, id) > ($3, $4::uuid))
             ORDER BY name, id LIMIT $5""",
        facility_id,
        include_inactive,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )


async def list_doctors(
    conn: asyncpg.Connection,
    *,
    q: str | None,
    facility_id: uuid.UUID | None,
    specialty: str | None,
    video: bool | None,
    after: tuple[str, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""SELECT {_DOCTOR} FROM doctors d JOIN facilities f ON f.id = d.facility_id
             WHERE d.active
               AND ($1::text IS NULL OR d.search_text LIKE fold_text($1))
               AND ($2::uuid IS NULL OR d.facility_id = $2)
               AND ($3::text IS NULL OR EXISTS (SELECT 1 FROM unnest(d.specialties) s
                                                 WHERE fold_text(s) = fold_text($3)))
               AND ($4::boolean IS NULL OR d.video = $4)
               AND ($5::text IS NULL OR (d.full_name, d.id) > ($5, $6::uuid))
             ORDER BY d.full_name, d.id LIMIT $7""",
        like_pattern(q) if q else None,
        facility_id,
        specialty,
        video,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )


async def get_doctor(conn: asyncpg.Connection, doctor_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_DOCTOR} FROM doctors d JOIN facilities f ON f.id = d.facility_id WHERE d.id = $1",
        doctor_id,
    )


async def upsert_facility(conn: asyncpg.Connection, values: dict[str, Any]) -> uuid.UUID:
    facility_id: uuid.UUID = await conn.fetchval(
        """INSERT INTO facilities (code, name, kind, district, address, phone, latitude, longitude,
                                   opening_hours, is_demo)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           ON CONFLICT (code) DO UPDATE SET name = EXCLUDED.name, kind = EXCLUDED.kind,
               district = EXCLUDED.district, address = EXCLUDED.address, phone = EXCLUDED.phone,
               latitude = EXCLUDED.latitude, longitude = EXCLUDED.longitude,
               opening_hours = EXCLUDED.opening_hours, is_demo = EXCLUDED.is_demo, updated_at = now()
           RETURNING id""",
        values["code"],
        values["name"],
        values["kind"],
        values["district"],
        values["address"],
        values.get("phone"),
        values.get("latitude"),
        values.get("longitude"),
        values.get("opening_hours", "[]"),
        values.get("is_demo", False),
    )
    return facility_id


async def find_facility_id(conn: asyncpg.Connection, id_or_code: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(id_or_code) if await facility_exists(conn, uuid.UUID(id_or_code)) else None
    except ValueError:
        found: uuid.UUID | None = await conn.fetchval("SELECT id FROM facilities WHERE code = $1", id_or_code)
        return found


async def insert_service(
    conn: asyncpg.Connection, facility_id: uuid.UUID, values: dict[str, Any]
) -> asyncpg.Record:
    """Insert, or update the service with the same code (seeding is idempotent on it)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""INSERT INTO services (facility_id, code, name, duration_minutes, price_vnd, video_offered,
                                  prepayment_required)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (facility_id, code) DO UPDATE SET name = EXCLUDED.name,
                duration_minutes = EXCLUDED.duration_minutes, price_vnd = EXCLUDED.price_vnd,
                video_offered = EXCLUDED.video_offered, prepayment_required = EXCLUDED.prepayment_required,
                updated_at = now()
            RETURNING {_SERVICE}""",
        facility_id,
        values["code"],
        values["name"],
        values["duration_minutes"],
        values["price_vnd"],
        values.get("video_offered", False),
        values.get("prepayment_required", False),
    )
    assert row is not None
    return row


async def update_service(
    conn: asyncpg.Connection, facility_id: uuid.UUID, service_id: uuid.UUID, changes: dict[str, Any]
) -> asyncpg.Record | None:
    assignments = "".join(f", {column} = ${i}" for i, column in enumerate(changes, start=3))
    return await conn.fetchrow(
        f"""UPDATE services SET updated_at = now(){assignments}
             WHERE id = $1 AND facility_id = $2 RETURNING {_SERVICE}""",
        service_id,
        facility_id,
        *changes.values(),
    )


async def insert_doctor(
    conn: asyncpg.Connection, facility_id: uuid.UUID, values: dict[str, Any]
) -> uuid.UUID:
    """Insert, or update the doctor with the same code; a personal ID also grants the doctor role."""
    doctor_id: uuid.UUID = await conn.fetchval(
        """INSERT INTO doctors (facility_id, code, full_name, title, specialties, languages, video, personal_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (facility_id, code) DO UPDATE SET full_name = EXCLUDED.full_name, title = EXCLUDED.title,
               specialties = EXCLUDED.specialties, languages = EXCLUDED.languages, video = EXCLUDED.video,
               personal_id = EXCLUDED.personal_id, updated_at = now()
           RETURNING id""",
        facility_id,
        values["code"],
        values["name"],
        values.get("title", ""),
        values.get("specialties", []),
        values.get("languages", ["vi"]),
        values.get("video", False),
        values.get("personal_id"),
    )
    if values.get("personal_id"):
        await add_staff(conn, facility_id, values["personal_id"], "doctor")
    return doctor_id


async def update_doctor(
    conn: asyncpg.Connection, facility_id: uuid.UUID, doctor_id: uuid.UUID, changes: dict[str, Any]
) -> bool:
    columns = {"name": "full_name"}
    assignments = "".join(f", {columns.get(c, c)} = ${i}" for i, c in enumerate(changes, start=3))
    result: str = await conn.execute(
        f"UPDATE doctors SET updated_at = now(){assignments} WHERE id = $1 AND facility_id = $2",
        doctor_id,
        facility_id,
        *changes.values(),
    )
    return result.endswith(" 1")


async def add_staff(
    conn: asyncpg.Connection, facility_id: uuid.UUID, personal_id: str, role: str
) -> asyncpg.Record:
    # DO UPDATE (a no-op) rather than DO NOTHING + SELECT: the SELECT's snapshot would miss a row a
    # concurrent grant of the same role has just committed, and return nothing.
    row: asyncpg.Record | None = await conn.fetchrow(
        """INSERT INTO staff (personal_id, facility_id, role) VALUES ($1, $2, $3)
           ON CONFLICT (personal_id, facility_id, role) DO UPDATE SET role = EXCLUDED.role
           RETURNING id""",
        personal_id,
        facility_id,
        role,
    )
    assert row is not None
    return row


async def list_staff(conn: asyncpg.Connection, facility_id: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT st.id, st.facility_id, st.personal_id, u.full_name, st.role, st.created_at
             FROM staff st LEFT JOIN users u ON u.personal_id = st.personal_id
            WHERE st.facility_id = $1 ORDER BY st.role, st.created_at, st.id""",
        facility_id,
    )


async def get_staff(
    conn: asyncpg.Connection, facility_id: uuid.UUID, staff_id: uuid.UUID
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT st.id, st.facility_id, st.personal_id, u.full_name, st.role, st.created_at
             FROM staff st LEFT JOIN users u ON u.personal_id = st.personal_id
            WHERE st.facility_id = $1 AND st.id = $2""",
        facility_id,
        staff_id,
    )


async def remove_staff(conn: asyncpg.Connection, facility_id: uuid.UUID, staff_id: uuid.UUID) -> str | None:
    """Delete a staff role; return what was removed, or None. The last administrator stays.

    Locks the facility's admin rows so two admins removing each other cannot leave none.
    """
    admins = await conn.fetch(
        "SELECT id FROM staff WHERE facility_id = $1 AND role = 'admin' ORDER BY id FOR UPDATE", facility_id
    )
    role: str | None = await conn.fetchval(
        "SELECT role FROM staff WHERE id = $1 AND facility_id = $2", staff_id, facility_id
    )
    if role is None:
        return None
    if role == "admin" and len(admins) <= 1:
        return "last_admin"
    await conn.execute("DELETE FROM staff WHERE id = $1", staff_id)
    return role
