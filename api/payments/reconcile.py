"""Reconciliation: attempts past their expiry that no callback settled are looked up with the
provider's query API, and the answer goes through `settle` like a callback would.

A VietQR transfer has no query API: an unanswered one simply expires (a late transfer notice
still settles it). Run by the housekeeping loop of `telehealth worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

import asyncpg
import httpx

from api.db import FairPool
from api.errors import ApiError
from api.payments import providers, queries, refunds
from api.payments.accounts import Account, account_for
from api.payments.redact import redact_callback
from api.payments.settle import Report, settle
from api.settings import Settings

log = logging.getLogger("telehealth.payments")
BATCH = 50


async def reconcile(pool: FairPool, settings: Settings, http: httpx.AsyncClient, now: dt.datetime) -> int:
    """One pass; how many attempts were looked at."""
    async with pool.acquire() as conn, conn.transaction():
        due = await queries.unanswered_attempts(conn, BATCH)
        await queries.expire_unanswerable(conn)
    for attempt in due:
        try:
            async with pool.acquire() as conn:
                account = await account_for(conn, settings, attempt["facility_id"], attempt["provider"])
            answer = await _ask(http, account, attempt)
        except (ApiError, httpx.HTTPError):
            log.warning("reconciliation could not reach %s; will ask again", attempt["provider"])
            continue
        if answer is None:
            continue
        async with pool.acquire() as conn, conn.transaction():
            outcome = answer.outcome
            report = Report(
                provider=attempt["provider"],
                order_ref=attempt["order_ref"],
                transaction_id=answer.transaction_id,
                amount_vnd=answer.amount_vnd,
                outcome=outcome,
                payload=redact_callback(attempt["provider"], answer.payload),
                source="reconciliation",
            )
            await settle(conn, settings, report, now)
            if outcome == "pending":
                # The provider never saw it paid and its time is up: nobody will pay it now.
                await queries.expire_attempt(conn, attempt["id"])
    return len(due)


async def _ask(
    http: httpx.AsyncClient, account: Account, attempt: asyncpg.Record
) -> providers.ProviderAnswer | None:
    if attempt["provider"] == "momo":
        return await providers.momo_query(http, account, attempt["order_ref"])
    if attempt["provider"] == "zalopay":
        return await providers.zalopay_query(http, account, attempt["order_ref"])
    if attempt["provider"] == "vnpay":
        return await providers.vnpay_query(http, account, attempt["order_ref"], attempt["created_at"])
    return None


async def run_payment_housekeeping(
    pool: FairPool, settings: Settings, stop: asyncio.Event, every: float = 30.0
) -> None:
    """Reconcile unanswered attempts and send requested refunds, until `stop` is set."""
    async with httpx.AsyncClient(timeout=settings.outbound_timeout_seconds) as http:
        while not stop.is_set():
            try:
                await reconcile(pool, settings, http, dt.datetime.now(dt.UTC))
                await refunds.send_requested(pool, settings, http)
            except Exception:
                log.exception("payment housekeeping failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)
