"""HTTP routes of the identity domain: VNeID sign-in, token refresh, logout, the caller's profile."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import msgspec
from litestar import Controller, Request, get, patch, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import JSONBody

from api.errors import BEARER, ApiError, error_responses
from api.identity import queries, sessions
from api.identity.current_user import CurrentUser, SignedInRequest
from api.identity.insurance import is_valid_insurance_number, normalize_insurance_number
from api.identity.models import (
    DependentOut,
    LogoutRequest,
    ProfileUpdate,
    RefreshRequest,
    TokenPair,
    UserOut,
    VneidSignIn,
)
from api.identity.personal_id import mask_personal_id
from api.identity.phone import normalize_phone
from api.identity.vneid import InvalidIdToken
from api.ratelimit import client_ip

AnyRequest = Request[Any, Any, Any]


def user_out(user: CurrentUser) -> UserOut:
    """The caller's own profile: the only place their personal ID is shown in full."""
    return UserOut(
        id=user.id,
        personal_id=user.personal_id,
        name=user.name,
        birthdate=user.birthdate,
        sex=user.sex,
        phone=user.phone,
        health_insurance_number=user.health_insurance_number,
        locale=user.locale,
        roles=sorted(user.roles),  # type: ignore[arg-type]
        staff=list(user.staff),
    )


async def _token_pair(conn: asyncpg.Connection, state: State, issued: sessions.IssuedTokens) -> TokenPair:
    row = await queries.load_current_user(conn, issued.user_id, issued.session_id, int(time.time()))
    if row is None:
        # Only a refresh can get here: a logout of the same session committed while it ran.
        raise ApiError("invalid_refresh_token")
    return TokenPair(
        access_token=issued.access_token,
        refresh_token=issued.refresh_token,
        token_type="Bearer",  # noqa: S106 (a scheme name, not a secret)
        expires_in=state.settings.access_token_ttl,
        user=user_out(CurrentUser.from_row(row, issued.session_id)),
    )


class AuthController(Controller):
    path = "/v1/auth"
    tags = ["identity"]

    @post(
        "/vneid",
        operation_id="signInWithVneid",
        summary="Exchange a VNeID ID token for our access and refresh tokens",
        status_code=200,
        responses=error_responses("invalid_id_token", "invalid_personal_id", "rate_limited"),
    )
    async def sign_in_with_vneid(
        self,
        request: AnyRequest,
        state: State,
        data: JSONBody[VneidSignIn],
        db: NamedDependency[asyncpg.Connection],
    ) -> TokenPair:
        await state.rate_limiter.hit(
            "sign-in", client_ip(request), limit=state.settings.sign_in_rate_per_minute
        )
        try:
            claims = await state.vneid_verifier.verify(data.id_token)
        except InvalidIdToken:
            raise ApiError("invalid_id_token") from None
        issued = await sessions.sign_in(db, state.settings, claims)
        return await _token_pair(db, state, issued)

    @post(
        "/refresh",
        operation_id="refreshTokens",
        summary="Rotate a refresh token into a new token pair",
        status_code=200,
        responses=error_responses("invalid_refresh_token", "refresh_token_reused", "rate_limited"),
    )
    async def refresh_tokens(
        self, request: AnyRequest, state: State, data: JSONBody[RefreshRequest]
    ) -> TokenPair:
        await state.rate_limiter.hit(
            "refresh", client_ip(request), limit=state.settings.sign_in_rate_per_minute * 3
        )
        async with state.db_pool.acquire() as conn:
            return await sessions.refresh(
                conn, state.settings, data.refresh_token, lambda issued: _token_pair(conn, state, issued)
            )

    @post(
        "/logout",
        operation_id="logout",
        security=[BEARER],
        summary="End this session, or every session of the user",
        status_code=204,
        responses=error_responses("unauthorized"),
    )
    async def logout(
        self, request: SignedInRequest, data: JSONBody[LogoutRequest], db: NamedDependency[asyncpg.Connection]
    ) -> None:
        await sessions.logout(db, request.user.id, request.user.session_id, everywhere=data.everywhere)


class MeController(Controller):
    path = "/v1/me"
    security = [BEARER]
    tags = ["identity"]

    @get(
        operation_id="getMe",
        summary="The signed-in user's profile and roles",
        responses=error_responses("unauthorized"),
    )
    async def get_me(self, request: SignedInRequest) -> UserOut:
        return user_out(request.user)

    @patch(
        operation_id="updateMe",
        summary="Update phone, health-insurance number or locale",
        responses=error_responses("unauthorized", "invalid_phone", "invalid_insurance_number"),
    )
    async def update_me(
        self, request: SignedInRequest, data: JSONBody[ProfileUpdate], db: NamedDependency[asyncpg.Connection]
    ) -> UserOut:
        changes: dict[str, Any] = {}
        if isinstance(data.phone, str):
            phone = normalize_phone(data.phone)
            if phone is None:
                raise ApiError("invalid_phone")
            changes["phone"] = phone
        elif data.phone is None:
            changes["phone"] = None
        if isinstance(data.health_insurance_number, str):
            number = normalize_insurance_number(data.health_insurance_number)
            if not is_valid_insurance_number(number):
                raise ApiError("invalid_insurance_number")
            changes["health_insurance_number"] = number
        elif data.health_insurance_number is None:
            changes["health_insurance_number"] = None
        if isinstance(data.locale, str):
            changes["locale"] = data.locale
        await queries.update_profile(db, request.user.id, changes)
        return user_out(msgspec.structs.replace(request.user, **changes))

    @get(
        "/dependents",
        operation_id="listMyDependents",
        summary="The children and other dependants this user is guardian of",
        responses=error_responses("unauthorized"),
    )
    async def list_my_dependents(
        self, request: SignedInRequest, db: NamedDependency[asyncpg.Connection]
    ) -> list[DependentOut]:
        rows = await queries.list_dependents(db, request.user.id)
        return [
            DependentOut(
                id=r["id"],
                personal_id=mask_personal_id(r["personal_id"]),
                name=r["full_name"],
                birthdate=r["birthdate"],
                sex=r["sex"],
                relationship=r["relationship"],
                source=r["source"],
            )
            for r in rows
        ]
