"""Keyset pagination: `?limit=&cursor=` in, `next_cursor` out.

A cursor is the sort key of the last item returned, base64url-encoded JSON; it carries no
secret and is validated like any other input.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar.params import QueryParameter

from api.errors import ApiError

MAX_LIMIT = 100

Limit = Annotated[
    int, QueryParameter(name="limit", ge=1, le=MAX_LIMIT, description=f"Page size, at most {MAX_LIMIT}.")
]
Cursor = Annotated[
    str | None,
    QueryParameter(name="cursor", max_length=512, description="`next_cursor` of the previous page."),
]


def encode_cursor(*key: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).decode().rstrip("=")


def next_cursor(rows: Sequence[asyncpg.Record], limit: int, *key: str) -> str | None:
    """The cursor after a page. Pages fetch `limit + 1` rows: the extra one only says that more
    exist; the cursor is the sort key (`key` columns) of the last row shown."""
    if len(rows) <= limit:
        return None
    last = rows[limit - 1]
    return encode_cursor(*(last[column] for column in key))


def decode_cursor(cursor: str, *types: type) -> tuple[Any, ...]:
    """Decode a cursor into values of `types`; a malformed one is 422 `invalid_cursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = msgspec.json.decode(raw, type=tuple[*types])  # type: ignore[valid-type]
    except (ValueError, msgspec.DecodeError):
        raise ApiError("invalid_cursor") from None
    return tuple(values)


def like_pattern(text: str) -> str:
    """`%text%` for LIKE with the caller's own wildcards escaped."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
