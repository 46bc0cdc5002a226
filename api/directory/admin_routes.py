"""Facility administration: an administrator manages their own facility's services, doctors and staff."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from api.access import require_at
from api.directory import queries
from api.directory.models import (
    DoctorCreate,
    DoctorOut,
    DoctorUpdate,
    GuardianshipCreate,
    GuardianshipOut,
    ServiceCreate,
    ServiceOut,
    ServiceUpdate,
    StaffCreate,
    StaffOut,
)
from api.directory.routes import doctor_out, service_out
from api.errors import BEARER, ApiError, error_responses
from api.identity import queries as identity_queries
from api.identity.current_user import SignedInRequest
from api.identity.personal_id import is_valid_personal_id, mask_personal_id, sex_from_personal_id

ADMIN_ERRORS = ("unauthorized", "forbidden", "not_found")


def _changes(update: msgspec.Struct) -> dict[str, Any]:
    return {k: v for k, v in msgspec.structs.asdict(update).items() if v is not msgspec.UNSET}


def staff_out(row: asyncpg.Record) -> StaffOut:
    return StaffOut(
        id=row["id"],
        facility_id=row["facility_id"],
        personal_id=mask_personal_id(row["personal_id"]),
        name=row["full_name"],
        role=row["role"],
        created_at=row["created_at"],
    )


class FacilityAdminController(Controller):
    path = "/v1/admin/facilities/{facility_id:uuid}"
    security = [BEARER]
    tags = ["facility administration"]

    @post(
        "/services",
        operation_id="createService",
        summary="Add a service (or update the one with the same code)",
        responses=error_responses(*ADMIN_ERRORS),
    )
    async def create_service(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FromPath[uuid.UUID],
        data: JSONBody[ServiceCreate],
    ) -> ServiceOut:
        require_at(request.user, facility_id, "admin")
        return service_out(await queries.insert_service(db, facility_id, msgspec.structs.asdict(data)))

    @patch(
        "/services/{service_id:uuid}",
        operation_id="updateService",
        summary="Change a service's name, duration, price or options",
        responses=error_responses(*ADMIN_ERRORS),
    )
    async def update_service(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FromPath[uuid.UUID],
        service_id: FromPath[uuid.UUID],
        data: JSONBody[ServiceUpdate],
    ) -> ServiceOut:
        require_at(request.user, facility_id, "admin")
        row = await queries.update_service(db, facility_id, service_id, _changes(data))
        if row is None:
            raise ApiError("not_found")
        return service_out(row)

    @post(
        "/doctors",
        operation_id="createDoctor",
        summary="Add a doctor to the directory (with their personal ID, the doctor role too)",
        responses=error_responses(*ADMIN_ERRORS, "invalid_personal_id", "conflict"),
    )
    async def create_doctor(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FromPath[uuid.UUID],
        data: JSONBody[DoctorCreate],
    ) -> DoctorOut:
        require_at(request.user, facility_id, "admin")
        if data.personal_id is not None and not is_valid_personal_id(data.personal_id):
            raise ApiError("invalid_personal_id")
        try:
            doctor_id = await queries.insert_doctor(db, facility_id, msgspec.structs.asdict(data))
        except asyncpg.UniqueViolationError:  # that personal ID is another doctor entry here already
            raise ApiError("conflict") from None
        row = await queries.get_doctor(db, doctor_id)
        assert row is not None
        return doctor_out(row)

    @patch(
        "/doctors/{doctor_id:uuid}",
        operation_id="updateDoctor",
        summary="Change a doctor's directory entry",
        responses=error_responses(*ADMIN_ERRORS),
    )
    async def update_doctor(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FromPath[uuid.UUID],
        doctor_id: FromPath[uuid.UUID],
        data: JSONBody[DoctorUpdate],
    ) -> DoctorOut:
        require_at(request.user, facility_id, "admin")
        if not await queries.update_doctor(db, facility_id, doctor_id, _changes(data)):
            raise ApiError("not_found")
        row = await queries.get_doctor(db, doctor_id)
        assert row is not None
        return doctor_out(row)

    @get(
        "/staff",
        operation_id="listStaff",
        summary="Staff roles at this facility",
        responses=error_responses(*ADMIN_ERRORS),
    )
    async def list_staff(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FromPath[uuid.UUID],
    ) -> list[StaffOut]:
        require_at(request.user, facility_id, "admin")
        return [staff_out(r) for r in await queries.list_staff(db, facility_id)]

    @post(
        "/staff",
        operation_id="addStaff",
        summary="Grant a staff role at this facility to a personal ID",
        responses=error_responses(*ADMIN_ERRORS, "invalid_personal_id"),
    )
    async def add_staff(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FromPath[uuid.UUID],
        data: JSONBody[StaffCreate],
    ) -> StaffOut:
        require_at(request.user, facility_id, "admin")
        if not is_valid_personal_id(data.personal_id):
            raise ApiError("invalid_personal_id")
        added = await queries.add_staff(db, facility_id, data.personal_id, data.role)
        row = await queries.get_staff(db, facility_id, added["id"])
        assert row is not None
        return staff_out(row)

    @delete(
        "/staff/{staff_id:uuid}",
        operation_id="removeStaff",
        summary="Remove a staff role; effective on the person's next request",
        responses=error_responses(*ADMIN_ERRORS, "conflict"),
    )
    async def remove_staff(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FromPath[uuid.UUID],
        staff_id: FromPath[uuid.UUID],
    ) -> None:
        require_at(request.user, facility_id, "admin")
        removed = await queries.remove_staff(db, facility_id, staff_id)
        if removed is None:
            raise ApiError("not_found")
        if removed == "last_admin":
            raise ApiError("last_admin")

    @post(
        "/guardianships",
        operation_id="recordGuardianship",
        summary="Record that a citizen is guardian of a dependant, after checking their papers",
        responses=error_responses(*ADMIN_ERRORS, "invalid_personal_id"),
    )
    async def record_guardianship(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FromPath[uuid.UUID],
        data: JSONBody[GuardianshipCreate],
    ) -> GuardianshipOut:
        require_at(request.user, facility_id, "facility_staff", "admin")
        sex = sex_from_personal_id(data.dependent_personal_id, data.dependent_birthdate)
        if sex is None or data.dependent_personal_id == data.guardian_personal_id:
            raise ApiError("invalid_personal_id")
        guardian_id = await identity_queries.user_id_by_personal_id(db, data.guardian_personal_id)
        if guardian_id is None:
            raise ApiError("not_found")
        dependent_id = await identity_queries.ensure_person(
            db,
            personal_id=data.dependent_personal_id,
            name=data.dependent_name,
            birthdate=data.dependent_birthdate,
            sex=sex,
        )
        await identity_queries.link_guardian(db, guardian_id, dependent_id, data.relationship, "staff")
        return GuardianshipOut(
            guardian_id=guardian_id, dependent_id=dependent_id, relationship=data.relationship, source="staff"
        )
