"""Public directory routes: find a facility, its services, a doctor."""

from __future__ import annotations

import uuid
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath, QueryParameter

from api.directory import queries
from api.directory.models import (
    DoctorOut,
    DoctorPage,
    FacilityKind,
    FacilityOut,
    FacilityPage,
    OpeningInterval,
    ServiceOut,
    ServicePage,
)
from api.errors import ApiError, error_responses
from api.pagination import Cursor, Limit, decode_cursor, next_cursor

SearchText = Annotated[
    str | None,
    QueryParameter(
        name="q", min_length=1, max_length=100, description="Ignores case and Vietnamese diacritics."
    ),
]

# A facility's or doctor's public page is the same for every caller and changes rarely, so each
# worker answers it from memory for a few seconds: an administrator's edit shows within that
# time. Only these by-id pages are cached (a bounded set); searches always read the database.
DETAIL_CACHE_SECONDS = 5


def facility_out(row: asyncpg.Record) -> FacilityOut:
    return FacilityOut(
        id=row["id"],
        code=row["code"],
        name=row["name"],
        kind=row["kind"],
        district=row["district"],
        address=row["address"],
        phone=row["phone"],
        latitude=row["latitude"],
        longitude=row["longitude"],
        opening_hours=msgspec.json.decode(row["opening_hours"], type=list[OpeningInterval]),
        is_demo=row["is_demo"],
    )


def service_out(row: asyncpg.Record) -> ServiceOut:
    return ServiceOut(**dict(row.items()))


def doctor_out(row: asyncpg.Record) -> DoctorOut:
    return DoctorOut(
        id=row["id"],
        facility_id=row["facility_id"],
        facility_name=row["facility_name"],
        code=row["code"],
        name=row["full_name"],
        title=row["title"],
        specialties=row["specialties"],
        languages=row["languages"],
        video=row["video"],
        active=row["active"],
    )


def _after(cursor: str | None) -> tuple[str, uuid.UUID] | None:
    return decode_cursor(cursor, str, uuid.UUID) if cursor else None


class FacilityController(Controller):
    path = "/v1/facilities"
    tags = ["directory"]

    @get(
        operation_id="listFacilities",
        summary="Search facilities",
        responses=error_responses("invalid_cursor"),
    )
    async def list_facilities(
        self,
        db: NamedDependency[asyncpg.Connection],
        q: SearchText = None,
        kind: Annotated[FacilityKind | None, QueryParameter(name="kind")] = None,
        district: Annotated[str | None, QueryParameter(name="district", max_length=100)] = None,
        limit: Limit = 20,
        cursor: Cursor = None,
    ) -> FacilityPage:
        rows = await queries.list_facilities(
            db, q=q, kind=kind, district=district, after=_after(cursor), limit=limit + 1
        )
        return FacilityPage(
            items=[facility_out(r) for r in rows[:limit]], next_cursor=next_cursor(rows, limit, "name", "id")
        )

    @get(
        "/{facility_id:uuid}",
        operation_id="getFacility",
        cache=DETAIL_CACHE_SECONDS,
        summary="One facility",
        responses=error_responses("not_found"),
    )
    async def get_facility(
        self, db: NamedDependency[asyncpg.Connection], facility_id: FromPath[uuid.UUID]
    ) -> FacilityOut:
        row = await queries.get_facility(db, facility_id)
        if row is None:
            raise ApiError("not_found")
        return facility_out(row)

    @get(
        "/{facility_id:uuid}/services",
        operation_id="listFacilityServices",
        summary="Services a facility offers, with price in VND",
        responses=error_responses("not_found", "invalid_cursor"),
    )
    async def list_facility_services(
        self,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FromPath[uuid.UUID],
        limit: Limit = 50,
        cursor: Cursor = None,
    ) -> ServicePage:
        rows = await queries.list_services(
            db, facility_id, include_inactive=False, after=_after(cursor), limit=limit + 1
        )
        if not rows and not await queries.facility_exists(db, facility_id):
            raise ApiError("not_found")
        return ServicePage(
            items=[service_out(r) for r in rows[:limit]], next_cursor=next_cursor(rows, limit, "name", "id")
        )


class DoctorController(Controller):
    path = "/v1/doctors"
    tags = ["directory"]

    @get(operation_id="listDoctors", summary="Search doctors", responses=error_responses("invalid_cursor"))
    async def list_doctors(
        self,
        db: NamedDependency[asyncpg.Connection],
        q: SearchText = None,
        facility_id: Annotated[uuid.UUID | None, QueryParameter(name="facility_id")] = None,
        specialty: Annotated[str | None, QueryParameter(name="specialty", max_length=80)] = None,
        video: Annotated[bool | None, QueryParameter(name="video")] = None,
        limit: Limit = 20,
        cursor: Cursor = None,
    ) -> DoctorPage:
        rows = await queries.list_doctors(
            db,
            q=q,
            facility_id=facility_id,
            specialty=specialty,
            video=video,
            after=_after(cursor),
            limit=limit + 1,
        )
        return DoctorPage(
            items=[doctor_out(r) for r in rows[:limit]],
            next_cursor=next_cursor(rows, limit, "full_name", "id"),
        )

    @get(
        "/{doctor_id:uuid}",
        operation_id="getDoctor",
        cache=DETAIL_CACHE_SECONDS,
        summary="One doctor",
        responses=error_responses("not_found"),
    )
    async def get_doctor(
        self, db: NamedDependency[asyncpg.Connection], doctor_id: FromPath[uuid.UUID]
    ) -> DoctorOut:
        row = await queries.get_doctor(db, doctor_id)
        if row is None:
            raise ApiError("not_found")
        return doctor_out(row)
