"""`Idempotency-Key` on POSTs that create something: the same key and body get the first
response again; the same key with another body is a 422.

The key is claimed with a transaction-scoped advisory lock, so a retry racing the original
waits for it and then replays its answer instead of creating a second thing. Only successes
are remembered: a request that failed rolled back, key row included, and may be retried.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import asyncpg
import msgspec
from litestar import Response
from litestar.params import HeaderParameter

from api.errors import ApiError

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        max_length=200,
        description="Required. A client-made unique key (a UUID); a retry with the same key and body replays the first response.",
    ),
]

T = TypeVar("T", bound=msgspec.Struct)


def request_digest(route: str, body: msgspec.Struct) -> bytes:
    """What a key's first request is remembered by: the same key with another digest is a 422."""
    return hashlib.sha256(route.encode() + b"\0" + msgspec.json.encode(body)).digest()


async def idempotent(
    conn: asyncpg.Connection,
    user_id: uuid.UUID,
    key: str | None,
    route: str,
    body: msgspec.Struct,
    response_type: type[T],
    create: Callable[[], Awaitable[tuple[int, T]]],
) -> Response[T]:
    """Run `create` once per (user, key); must be called inside the request's transaction."""
    if not key:
        raise ApiError("idempotency_key_required")
    digest = request_digest(route, body)
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{user_id}:{key}")
    seen = await conn.fetchrow(
        "SELECT request_hash, status_code, response FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        user_id,
        key,
    )
    if seen is not None:
        if bytes(seen["request_hash"]) != digest:
            raise ApiError("idempotency_key_reused")
        replay = msgspec.json.decode(seen["response"], type=response_type)
        return Response(replay, status_code=seen["status_code"], headers={"Idempotent-Replayed": "true"})
    status_code, result = await create()
    await conn.execute(
        """INSERT INTO idempotency_keys (user_id, key, route, request_hash, status_code, response)
           VALUES ($1, $2, $3, $4, $5, $6::jsonb)""",
        user_id,
        key,
        route,
        digest,
        status_code,
        msgspec.json.encode(result).decode(),
    )
    return Response(result, status_code=status_code)
