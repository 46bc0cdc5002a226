"""Background work of booking: expire holds past their time, offer freed slots to the
waitlist, and write visits' reminders when they fall due. Run by `telehealth worker` beside the
notification worker (in dev, inside the API process). Reads never wait for it: an expired hold
already shows as expired and frees its slot."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

from api.booking import waitlist
from api.booking.queries import expire_holds
from api.booking.reminders import send_due_reminders
from api.db import FairPool
from api.settings import Settings

log = logging.getLogger("telehealth.booking")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def expire_and_offer(pool: FairPool, settings: Settings) -> int:
    """One pass: expire due holds (a batch, each with its invoice) and offer their slots on; the count."""
    async with pool.acquire() as conn, conn.transaction():
        expired = await expire_holds(conn)
        for row in expired:
            await waitlist.offer_freed_slot(conn, settings, row, utcnow())
    return len(expired)


async def remind(pool: FairPool) -> int:
    """One batch of due reminders; the number of visits reminded."""
    async with pool.acquire() as conn, conn.transaction():
        return await send_due_reminders(conn, utcnow())


async def run_housekeeping(
    pool: FairPool, settings: Settings, stop: asyncio.Event, every: float = 5.0
) -> None:
    while not stop.is_set():
        try:
            while await expire_and_offer(pool, settings):
                pass
            while await remind(pool):
                pass
        except Exception:
            log.exception("booking housekeeping failed; trying again")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
