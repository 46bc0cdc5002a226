"""Request and response bodies of the identity routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

import msgspec

Locale = Literal["vi", "en"]
Role = Literal["citizen", "guardian", "doctor", "facility_staff", "admin"]


class VneidSignIn(msgspec.Struct, forbid_unknown_fields=True):
    id_token: Annotated[str, msgspec.Meta(min_length=10, max_length=16_000)]


class RefreshRequest(msgspec.Struct, forbid_unknown_fields=True):
    refresh_token: Annotated[str, msgspec.Meta(min_length=10, max_length=200)]


class LogoutRequest(msgspec.Struct, forbid_unknown_fields=True):
    everywhere: bool = False
    """Also end every other session of this user (all devices)."""


class StaffMembership(msgspec.Struct):
    facility_id: uuid.UUID
    role: Literal["doctor", "facility_staff", "admin"]


class UserOut(msgspec.Struct):
    id: uuid.UUID
    personal_id: str
    """In full for its owner only; masked (`011*******89`) everywhere else."""
    name: str
    birthdate: dt.date
    sex: Literal["male", "female"]
    phone: str | None
    health_insurance_number: str | None
    locale: Locale
    roles: list[Role]
    staff: list[StaffMembership]


class TokenPair(msgspec.Struct):
    access_token: str
    refresh_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    user: UserOut


class ProfileUpdate(msgspec.Struct, forbid_unknown_fields=True):
    phone: str | msgspec.UnsetType | None = msgspec.UNSET
    health_insurance_number: str | msgspec.UnsetType | None = msgspec.UNSET
    locale: Locale | msgspec.UnsetType = msgspec.UNSET


class DependentOut(msgspec.Struct):
    id: uuid.UUID
    personal_id: str
    name: str
    birthdate: dt.date
    sex: Literal["male", "female"]
    relationship: str
    source: Literal["vneid", "staff"]
