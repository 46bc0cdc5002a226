"""SQL of the device, inbox and preference routes (the worker's SQL is in notifications/outbox.py)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

import asyncpg

_DEVICE = "id, platform, locale, active, created_at, updated_at"
_INBOX = "id, kind, params, not_before, read_at"
# The inbox shows what is due and not withdrawn: a reminder for tomorrow appears tomorrow, and
# a cancelled visit's reminders never appear.
_VISIBLE = "push_state <> 'cancelled' AND not_before <= now()"


async def register_device(
    conn: asyncpg.Connection, user_id: uuid.UUID, token: str, platform: str, locale: str
) -> tuple[asyncpg.Record, bool]:
    """Add or refresh the device with this token and bind it to `user_id`; (row, created).

    A token signed in as another user moves to this one: a phone handed over must not keep
    showing the previous owner's notifications.
    """
    row = await conn.fetchrow(
        f"""INSERT INTO devices (user_id, token, platform, locale) VALUES ($1, $2, $3, $4)
            ON CONFLICT (token) DO UPDATE
               SET user_id = excluded.user_id, platform = excluded.platform, locale = excluded.locale,
                   active = true, deactivated_reason = NULL, updated_at = now()
            RETURNING {_DEVICE}, (xmax = 0) AS created""",
        user_id,
        token,
        platform,
        locale,
    )
    assert row is not None  # an upsert always returns its row
    return row, row["created"]


async def delete_device(conn: asyncpg.Connection, user_id: uuid.UUID, device_id: uuid.UUID) -> bool:
    result: str = await conn.execute("DELETE FROM devices WHERE id = $1 AND user_id = $2", device_id, user_id)
    return result == "DELETE 1"


async def list_inbox(
    conn: asyncpg.Connection,
    user_id: uuid.UUID,
    *,
    unread_only: bool,
    after: tuple[dt.datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_INBOX} FROM notifications
             WHERE user_id = $1 AND {_VISIBLE} AND (NOT $2 OR read_at IS NULL)
               AND ($3::timestamptz IS NULL OR (not_before, id) < ($3, $4::uuid))
             ORDER BY not_before DESC, id DESC LIMIT $5""",
        user_id,
        unread_only,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return rows


async def mark_read(
    conn: asyncpg.Connection, user_id: uuid.UUID, notification_id: uuid.UUID
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""UPDATE notifications SET read_at = coalesce(read_at, now())
             WHERE id = $1 AND user_id = $2 AND {_VISIBLE}
         RETURNING {_INBOX}""",
        notification_id,
        user_id,
    )
    return row


async def get_preferences(conn: asyncpg.Connection, user_id: uuid.UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT quiet_start, quiet_end, muted_categories FROM notification_preferences WHERE user_id = $1",
        user_id,
    )
    return row


async def put_preferences(
    conn: asyncpg.Connection,
    user_id: uuid.UUID,
    quiet_start: dt.time | None,
    quiet_end: dt.time | None,
    muted_categories: Sequence[str],
) -> None:
    await conn.execute(
        """INSERT INTO notification_preferences (user_id, quiet_start, quiet_end, muted_categories)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (user_id) DO UPDATE
              SET quiet_start = excluded.quiet_start, quiet_end = excluded.quiet_end,
                  muted_categories = excluded.muted_categories, updated_at = now()""",
        user_id,
        quiet_start,
        quiet_end,
        list(muted_categories),
    )
