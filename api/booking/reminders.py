"""Reminders of a booked visit, written when they fall due (migration 0010).

A booked appointment carries the time of its next reminder (`next_reminder_at`, kept by a
trigger whenever its status or start changes: a day and 15 minutes before the visit, only
those still ahead when it was booked or moved). The housekeeping job calls `send_due_reminders`
every few seconds; each due visit gets one outbox row per recipient and moves on to its next
reminder in the same transaction, so a reminder is written exactly once however many jobs run.
"""

from __future__ import annotations

import datetime as dt

import asyncpg

from api.booking import queries
from api.booking.booking import tell


async def send_due_reminders(conn: asyncpg.Connection, now: dt.datetime, limit: int = 500) -> int:
    """Write the reminders due at `now` (a batch); the number of visits reminded."""
    due = await queries.claim_due_reminders(conn, now, limit)
    for row in due:
        if row["starts_at"] > now:  # a job stopped past the visit's start has nothing left to say
            await tell(conn, row, row["reminder"])
    return len(due)
