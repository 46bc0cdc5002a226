"""Sign-in, refresh-token rotation with reuse detection, and logout."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import msgspec

from api.errors import ApiError
from api.identity import queries
from api.identity.personal_id import is_valid_personal_id, sex_from_personal_id
from api.identity.tokens import hash_refresh_token, issue_access_token, new_refresh_token
from api.identity.vneid import IdTokenClaims
from api.settings import Settings

log = logging.getLogger("telehealth.identity")

T = TypeVar("T")


class IssuedTokens(msgspec.Struct, frozen=True):
    access_token: str
    refresh_token: str
    user_id: uuid.UUID
    session_id: uuid.UUID


async def sign_in(conn: asyncpg.Connection, settings: Settings, claims: IdTokenClaims) -> IssuedTokens:
    """Create or refresh the citizen from verified claims, sync dependents, open a session."""
    if not is_valid_personal_id(claims.sub, birthdate=claims.birthdate, sex=claims.gender):
        raise ApiError("invalid_personal_id")
    user_id = await queries.upsert_citizen(conn, claims)
    accepted = []
    for dependent in claims.dependents:
        sex = sex_from_personal_id(dependent.personal_id, dependent.birthdate)
        if sex is None:
            # A malformed entry from the issuer must not lock the guardian out; it is skipped.
            log.warning("dependent with an invalid personal ID skipped", extra={"user_id": str(user_id)})
            continue
        accepted.append((dependent, sex))
    await queries.replace_vneid_dependents(conn, user_id, accepted)
    session_id = await queries.create_session(conn, user_id)
    return await _issue(conn, settings, user_id, session_id)


async def refresh(
    conn: asyncpg.Connection,
    settings: Settings,
    refresh_token: str,
    respond: Callable[[IssuedTokens], Awaitable[T]],
) -> T:
    """Spend the token, issue the next pair and answer with `respond`; a spent token coming back
    revokes its family.

    Runs its own transactions: the revocation must commit even though the call then fails.
    `respond` runs inside the spending transaction: a concurrent request with the same token
    waits on the row lock until it commits, so that request's family revocation cannot land
    between this rotation and its answer (which would turn the one winner into a 500).
    """
    token_hash = hash_refresh_token(refresh_token)
    async with conn.transaction():
        spent = await queries.spend_refresh_token(conn, token_hash)
        if spent is not None:
            return await respond(await _issue(conn, settings, spent["user_id"], spent["session_id"]))
    known = await queries.session_of_token(conn, token_hash)
    if known is not None and known["spent"]:
        # A spent token came back: someone holds a copy. End the whole family (RFC 9700 §4.14.2).
        await queries.revoke_session(conn, known["session_id"], "refresh_token_reused")
        raise ApiError("refresh_token_reused")
    raise ApiError("invalid_refresh_token")


async def logout(
    conn: asyncpg.Connection, user_id: uuid.UUID, session_id: uuid.UUID, *, everywhere: bool
) -> None:
    if everywhere:
        await queries.revoke_all_sessions(conn, user_id, "logout_everywhere")
    else:
        await queries.revoke_session(conn, session_id, "logout")


async def _issue(
    conn: asyncpg.Connection, settings: Settings, user_id: uuid.UUID, session_id: uuid.UUID
) -> IssuedTokens:
    refresh_token = new_refresh_token()
    expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.refresh_token_ttl)
    await queries.store_refresh_token(conn, session_id, hash_refresh_token(refresh_token), expires_at)
    access_token = issue_access_token(settings, user_id=user_id, session_id=session_id)
    return IssuedTokens(access_token, refresh_token, user_id, session_id)
