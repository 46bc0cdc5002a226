"""Starting the background worker: the notification worker, booking housekeeping (expiring
holds, waitlist offers, visit reminders) and payment housekeeping (reconciliation, refunds), in
the API process (dev) or alone (`telehealth worker`, production)."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from api.booking.housekeeping import run_housekeeping
from api.db import FairPool, create_pool
from api.observability import configure_logging
from api.payments.reconcile import run_payment_housekeeping
from api.settings import Settings
from notifications.push import FcmSender
from notifications.worker import Worker


@asynccontextmanager
async def push_sender(settings: Settings) -> AsyncIterator[FcmSender]:
    """FCM as the settings say: the service account in FCM_CREDENTIALS_FILE, or in dev without
    one, a local FCM emulator on loopback with its own generated service account."""
    timeout = settings.outbound_timeout_seconds
    if settings.fcm_credentials_file:
        account = json.loads(await asyncio.to_thread(Path(settings.fcm_credentials_file).read_text))
        sender = FcmSender(account, endpoint=settings.fcm_endpoint, timeout=timeout)
        try:
            yield sender
        finally:
            await sender.close()
        return
    from notifications.fcm_emulator import FcmEmulator

    with FcmEmulator() as emulator:
        sender = FcmSender(emulator.service_account_info(), endpoint=emulator.send_url, timeout=timeout)
        try:
            yield sender
        finally:
            await sender.close()


@asynccontextmanager
async def running_worker(settings: Settings, pool: FairPool) -> AsyncIterator[Worker]:
    """The notification worker and booking housekeeping, running in this event loop until the
    block ends (then each finishes its pass)."""
    assert settings.database_url
    async with push_sender(settings) as sender:
        worker = Worker(
            pool,
            sender,
            batch_size=settings.notification_batch_size,
            max_attempts=settings.notification_max_attempts,
            lease=dt.timedelta(seconds=settings.notification_lease_seconds),
        )
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(worker.run(settings.database_url, stop, settings.notification_poll_seconds)),
            asyncio.create_task(run_housekeeping(pool, settings, stop)),
            asyncio.create_task(run_payment_housekeeping(pool, settings, stop)),
        ]
        try:
            yield worker
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def run_standalone(settings: Settings) -> None:
    """`telehealth worker`: work until SIGTERM or SIGINT, then finish the current pass and exit."""
    assert settings.database_url
    configure_logging(settings.log_level)
    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with running_worker(settings, pool):
            _collect_less()
            await stop.wait()
    finally:
        await pool.close()


def _collect_less() -> None:
    """Tune the cyclic garbage collector for a process that pushes hundreds of requests at once.

    Each request in flight holds a few dozen container objects (httpx request and response,
    headers, coroutines, futures), so with the default threshold (700 net allocations) a batch
    set off a young collection every couple of pushes and promoted what was in flight to the
    older generations, whose full collections walked every module, class and function loaded
    (firebase-admin, google-auth, httpx, asyncpg): a fifth of the worker's CPU. Everything
    allocated by start-up is frozen out of collection, and young collections wait for 50,000
    objects (a few MB; almost all are freed by reference counting before that).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
