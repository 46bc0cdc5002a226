"""Who is calling: bearer-token authentication for every request, and the signed-in user."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

import asyncpg
import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.middleware.authentication import AbstractAuthenticationMiddleware, AuthenticationResult

from api.access import authorize
from api.errors import ApiError
from api.identity.models import StaffMembership
from api.identity.queries import load_current_user
from api.identity.tokens import InvalidToken


class CurrentUser(msgspec.Struct, frozen=True):
    id: uuid.UUID
    session_id: uuid.UUID
    personal_id: str
    name: str
    birthdate: dt.date
    sex: Literal["male", "female"]
    phone: str | None
    health_insurance_number: str | None
    locale: Literal["vi", "en"]
    roles: frozenset[str]
    staff: tuple[StaffMembership, ...]

    def is_at(self, facility_id: uuid.UUID, *roles: str) -> bool:
        """Whether the user holds one of `roles` at that facility."""
        return any(m.facility_id == facility_id and m.role in roles for m in self.staff)

    @classmethod
    def from_row(cls, row: asyncpg.Record, session_id: uuid.UUID) -> CurrentUser:
        staff = tuple(
            StaffMembership(facility_id=uuid.UUID(facility), role=role)
            for facility, role in (m.split(":") for m in sorted(row["memberships"]))
        )
        roles = {"citizen", *(m.role for m in staff)}
        if row["is_guardian"]:
            roles.add("guardian")
        return cls(
            id=row["id"],
            session_id=session_id,
            personal_id=row["personal_id"],
            name=row["full_name"],
            birthdate=row["birthdate"],
            sex=row["sex"],
            phone=row["phone"],
            health_insurance_number=row["health_insurance_number"],
            locale=row["locale"],
            roles=frozenset(roles),
            staff=staff,
        )


SignedInRequest = Request[CurrentUser, Any, Any]
"""A request that passed the bearer check: `request.user` is the caller."""

SESSION_CHECKED_BY_STATEMENT = "session_checked_by_statement"
"""Route opt: the route's one statement checks the caller's session itself (live_session,
migration 0008), so the bearer check verifies the token only: one round trip, not two."""


class SessionToken(msgspec.Struct, frozen=True):
    """The caller of a `SESSION_CHECKED_BY_STATEMENT` route: what its verified access token says.
    Every signed-in person is a citizen; the session is not known to be live until the route's
    statement has said so."""

    id: uuid.UUID
    session_id: uuid.UUID
    issued_at: int
    roles: frozenset[str] = frozenset({"citizen"})


TokenRequest = Request[SessionToken, Any, Any]
"""A request to a `SESSION_CHECKED_BY_STATEMENT` route whose token is valid."""


class BearerAuthenticationMiddleware(AbstractAuthenticationMiddleware):
    """Sets `request.user` from `Authorization: Bearer <access JWT>`, then applies the route table.

    No header means anonymous. The user, roles and session are read from the database on every
    request, so logout, logout-everywhere and a removed staff role take effect on the next
    request (on a `SESSION_CHECKED_BY_STATEMENT` route, the route's statement checks the
    session). Whether the caller may use the route is `api.access.authorize`'s decision, made
    here once the caller is known (deny by default).
    """

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        result = await self._authenticate(connection)
        authorize(connection.scope, result.user)
        return result

    async def _authenticate(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        header = connection.headers.get("authorization")
        if not header:
            return AuthenticationResult(user=None, auth=None)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError("invalid_token")
        state = connection.app.state
        try:
            claims = state.verified_tokens.verify(state.settings, token.strip())
        except InvalidToken:
            raise ApiError("invalid_token") from None
        if connection.scope["route_handler"].opt.get(SESSION_CHECKED_BY_STATEMENT):
            return AuthenticationResult(user=SessionToken(claims.sub, claims.sid, claims.iat), auth=claims)
        async with state.db_pool.acquire() as conn:
            row = await load_current_user(conn, claims.sub, claims.sid, claims.iat)
        if row is None:
            raise ApiError("invalid_token")
        return AuthenticationResult(user=CurrentUser.from_row(row, claims.sid), auth=claims)
