"""Bodies of the directory routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

import msgspec

FacilityKind = Literal[
    "provincial_hospital", "specialist_centre", "district_medical_centre", "commune_station", "private_clinic"
]
StaffRole = Literal["doctor", "facility_staff", "admin"]
HourMinute = Annotated[str, msgspec.Meta(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
Code = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,40}$")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
PersonalId = Annotated[str, msgspec.Meta(pattern=r"^\d{12}$")]
Words = Annotated[
    list[Annotated[str, msgspec.Meta(min_length=1, max_length=80)]], msgspec.Meta(max_length=20)
]


class OpeningInterval(msgspec.Struct):
    weekday: Annotated[int, msgspec.Meta(ge=1, le=7, description="ISO weekday, 1 = Monday")]
    opens: HourMinute
    closes: HourMinute


class FacilityOut(msgspec.Struct):
    id: uuid.UUID
    code: str
    name: str
    kind: FacilityKind
    district: str
    address: str
    phone: str | None
    latitude: float | None
    longitude: float | None
    opening_hours: list[OpeningInterval]
    is_demo: bool


class FacilityPage(msgspec.Struct):
    items: list[FacilityOut]
    next_cursor: str | None


class ServiceOut(msgspec.Struct):
    id: uuid.UUID
    facility_id: uuid.UUID
    code: str
    name: str
    duration_minutes: int
    price_vnd: int
    video_offered: bool
    prepayment_required: bool
    active: bool


class ServicePage(msgspec.Struct):
    items: list[ServiceOut]
    next_cursor: str | None


class DoctorOut(msgspec.Struct):
    id: uuid.UUID
    facility_id: uuid.UUID
    facility_name: str
    code: str
    name: str
    title: str
    specialties: list[str]
    languages: list[str]
    video: bool
    active: bool


class DoctorPage(msgspec.Struct):
    items: list[DoctorOut]
    next_cursor: str | None


class ServiceCreate(msgspec.Struct, forbid_unknown_fields=True):
    code: Code
    name: Name
    duration_minutes: Annotated[int, msgspec.Meta(ge=5, le=480)]
    price_vnd: Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
    video_offered: bool = False
    prepayment_required: bool = False


class ServiceUpdate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    duration_minutes: Annotated[int, msgspec.Meta(ge=5, le=480)] | msgspec.UnsetType = msgspec.UNSET
    price_vnd: Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)] | msgspec.UnsetType = msgspec.UNSET
    video_offered: bool | msgspec.UnsetType = msgspec.UNSET
    prepayment_required: bool | msgspec.UnsetType = msgspec.UNSET
    active: bool | msgspec.UnsetType = msgspec.UNSET


class DoctorCreate(msgspec.Struct, forbid_unknown_fields=True):
    code: Code
    name: Name
    title: Annotated[str, msgspec.Meta(max_length=120)] = ""
    specialties: Words = []
    languages: Words = msgspec.field(default_factory=lambda: ["vi"])
    video: bool = False
    personal_id: PersonalId | None = None
    """The doctor's own personal ID: grants the doctor role at this facility when they sign in."""


class DoctorUpdate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    title: Annotated[str, msgspec.Meta(max_length=120)] | msgspec.UnsetType = msgspec.UNSET
    specialties: Words | msgspec.UnsetType = msgspec.UNSET
    languages: Words | msgspec.UnsetType = msgspec.UNSET
    video: bool | msgspec.UnsetType = msgspec.UNSET
    active: bool | msgspec.UnsetType = msgspec.UNSET


class StaffCreate(msgspec.Struct, forbid_unknown_fields=True):
    personal_id: PersonalId
    role: StaffRole


class StaffOut(msgspec.Struct):
    id: uuid.UUID
    facility_id: uuid.UUID
    personal_id: str
    """Masked: administrators recognise their staff without copying their IDs."""
    name: str | None
    role: StaffRole
    created_at: dt.datetime


class GuardianshipCreate(msgspec.Struct, forbid_unknown_fields=True):
    """A guardianship recorded by facility staff who checked the papers (e.g. a birth certificate)."""

    guardian_personal_id: PersonalId
    dependent_personal_id: PersonalId
    dependent_name: Name
    dependent_birthdate: dt.date
    relationship: Annotated[str, msgspec.Meta(min_length=1, max_length=40)]


class GuardianshipOut(msgspec.Struct):
    guardian_id: uuid.UUID
    dependent_id: uuid.UUID
    relationship: str
    source: Literal["staff"]
