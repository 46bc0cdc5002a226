"""SQL of the identity domain."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from api.identity.vneid import Dependent, IdTokenClaims

_USER_COLUMNS = (
    "u.id, u.personal_id, u.full_name, u.birthdate, u.sex, u.phone, u.health_insurance_number, u.locale"
)


async def upsert_citizen(conn: asyncpg.Connection, claims: IdTokenClaims) -> uuid.UUID:
    """Create or refresh the user keyed by personal ID from VNeID's verified claims."""
    user_id: uuid.UUID = await conn.fetchval(
        """INSERT INTO users (personal_id, full_name, birthdate, sex, phone, last_sign_in_at)
           VALUES ($1, $2, $3, $4, $5, now())
           ON CONFLICT (personal_id) DO UPDATE
              SET full_name = EXCLUDED.full_name, birthdate = EXCLUDED.birthdate, sex = EXCLUDED.sex,
                  phone = coalesce(users.phone, EXCLUDED.phone), last_sign_in_at = now(), updated_at = now()
           RETURNING id""",
        claims.sub,
        claims.name,
        claims.birthdate,
        claims.gender,
        claims.phone_number,
    )
    return user_id


async def ensure_person(
    conn: asyncpg.Connection, *, personal_id: str, name: str, birthdate: dt.date, sex: str
) -> uuid.UUID:
    """The user with this personal ID, created (without a sign-in) when first named by a trusted source."""
    person_id: uuid.UUID = await conn.fetchval(
        """INSERT INTO users (personal_id, full_name, birthdate, sex) VALUES ($1, $2, $3, $4)
           ON CONFLICT (personal_id) DO UPDATE SET updated_at = users.updated_at
           RETURNING id""",
        personal_id,
        name,
        birthdate,
        sex,
    )
    return person_id


async def link_guardian(
    conn: asyncpg.Connection, guardian_id: uuid.UUID, dependent_id: uuid.UUID, relationship: str, source: str
) -> None:
    """Record a guardianship; one confirmed by staff stays staff-sourced when VNeID lists it too."""
    await conn.execute(
        """INSERT INTO guardianships (guardian_id, dependent_id, relationship, source) VALUES ($1, $2, $3, $4)
           ON CONFLICT (guardian_id, dependent_id) DO UPDATE
              SET relationship = EXCLUDED.relationship, updated_at = now(),
                  source = CASE WHEN EXCLUDED.source = 'staff' THEN 'staff' ELSE guardianships.source END""",
        guardian_id,
        dependent_id,
        relationship,
        source,
    )


async def replace_vneid_dependents(
    conn: asyncpg.Connection, guardian_id: uuid.UUID, dependents: Sequence[tuple[Dependent, str]]
) -> None:
    """Make the VNeID-sourced guardianships exactly the claim's list (with each dependent's sex)."""
    kept: list[uuid.UUID] = []
    for dependent, sex in dependents:
        dependent_id = await ensure_person(
            conn,
            personal_id=dependent.personal_id,
            name=dependent.name,
            birthdate=dependent.birthdate,
            sex=sex,
        )
        if dependent_id == guardian_id:
            continue
        kept.append(dependent_id)
        await link_guardian(conn, guardian_id, dependent_id, dependent.relationship, "vneid")
    await conn.execute(
        "DELETE FROM guardianships WHERE guardian_id = $1 AND source = 'vneid' AND NOT dependent_id = ANY($2)",
        guardian_id,
        kept,
    )


async def user_id_by_personal_id(conn: asyncpg.Connection, personal_id: str) -> uuid.UUID | None:
    found: uuid.UUID | None = await conn.fetchval("SELECT id FROM users WHERE personal_id = $1", personal_id)
    return found


async def create_session(conn: asyncpg.Connection, user_id: uuid.UUID) -> uuid.UUID:
    session_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO auth_sessions (user_id) VALUES ($1) RETURNING id", user_id
    )
    return session_id


async def store_refresh_token(
    conn: asyncpg.Connection, session_id: uuid.UUID, token_hash: bytes, expires_at: dt.datetime
) -> None:
    await conn.execute(
        "INSERT INTO refresh_tokens (token_hash, session_id, expires_at) VALUES ($1, $2, $3)",
        token_hash,
        session_id,
        expires_at,
    )


async def spend_refresh_token(conn: asyncpg.Connection, token_hash: bytes) -> asyncpg.Record | None:
    """Mark the token spent if it is live. Concurrent callers serialise on the row: one wins."""
    return await conn.fetchrow(
        """UPDATE refresh_tokens t SET spent_at = now()
             FROM auth_sessions s
            WHERE t.token_hash = $1 AND t.spent_at IS NULL AND t.expires_at > now()
              AND s.id = t.session_id AND s.revoked_at IS NULL
           RETURNING t.session_id, s.user_id""",
        token_hash,
    )


async def session_of_token(conn: asyncpg.Connection, token_hash: bytes) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT session_id, spent_at IS NOT NULL AS spent FROM refresh_tokens WHERE token_hash = $1",
        token_hash,
    )


async def revoke_session(conn: asyncpg.Connection, session_id: uuid.UUID, reason: str) -> None:
    await conn.execute(
        "UPDATE auth_sessions SET revoked_at = now(), revoke_reason = $2 WHERE id = $1 AND revoked_at IS NULL",
        session_id,
        reason,
    )


async def revoke_all_sessions(conn: asyncpg.Connection, user_id: uuid.UUID, reason: str) -> None:
    await conn.execute("UPDATE users SET tokens_valid_after = now() WHERE id = $1", user_id)
    await conn.execute(
        "UPDATE auth_sessions SET revoked_at = now(), revoke_reason = $2 WHERE user_id = $1 AND revoked_at IS NULL",
        user_id,
        reason,
    )


# One round trip per authenticated request: the profile, its roles, and whether the session
# and the token's issue time are still honoured (live_session, migration 0008: the rule
# book_appointment applies too). Memberships come unsorted (CurrentUser sorts them): an
# aggregate with ORDER BY made this query a fifth more expensive for PostgreSQL.
_CURRENT_USER = f"""
SELECT {_USER_COLUMNS},
       EXISTS (SELECT 1 FROM guardianships g WHERE g.guardian_id = u.id) AS is_guardian,
       ARRAY(SELECT st.facility_id::text || ':' || st.role
               FROM staff st WHERE st.personal_id = u.personal_id) AS memberships
  FROM users u
  JOIN live_session($1, $2, $3) live ON live.user_id = u.id
 WHERE u.id = $1
"""


async def load_current_user(
    conn: asyncpg.Connection, user_id: uuid.UUID, session_id: uuid.UUID, issued_at: int
) -> asyncpg.Record | None:
    return await conn.fetchrow(_CURRENT_USER, user_id, session_id, issued_at)


async def session_is_live(
    conn: asyncpg.Connection, user_id: uuid.UUID, session_id: uuid.UUID, issued_at: int
) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM live_session($1, $2, $3))", user_id, session_id, issued_at
        )
    )


async def update_profile(conn: asyncpg.Connection, user_id: uuid.UUID, changes: dict[str, Any]) -> None:
    if not changes:
        return
    columns = list(changes)
    assignments = ", ".join(f"{column} = ${i}" for i, column in enumerate(columns, start=2))
    await conn.execute(
        f"UPDATE users SET {assignments}, updated_at = now() WHERE id = $1",
        user_id,
        *changes.values(),
    )


async def list_dependents(conn: asyncpg.Connection, guardian_id: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""SELECT {_USER_COLUMNS}, g.relationship, g.source
              FROM guardianships g JOIN users u ON u.id = g.dependent_id
             WHERE g.guardian_id = $1 ORDER BY u.birthdate, u.id""",
        guardian_id,
    )
