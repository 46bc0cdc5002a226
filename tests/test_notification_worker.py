"""The outbox and the worker against real PostgreSQL and the real firebase-admin talking to the
local FCM emulator: enqueue in transactions, claim with SKIP LOCKED, retries, dead letters,
token rejection, quiet hours, a killed worker process, two workers at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import notifications
from api.clinic_time import CLINIC_TZ
from api.db import FairPool, create_pool
from notifications.fcm_emulator import FcmEmulator
from notifications.push import FcmSender
from notifications.worker import Worker, utcnow
from tests.conftest import make_settings
from tests.factories import insert_device, insert_user, notify, pushing_in_process, serve

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def sender_for(fcm: FcmEmulator, fcm_timeout: float = 5) -> AsyncIterator[FcmSender]:
    sender = FcmSender(fcm.service_account_info(), endpoint=fcm.send_url, timeout=fcm_timeout)
    try:
        yield sender
    finally:
        await sender.close()


@asynccontextmanager
async def worker_for(
    pool: FairPool,
    fcm: FcmEmulator,
    *,
    clock: Callable[[], dt.datetime] = utcnow,
    fcm_timeout: float = 5,
    **options: int,
) -> AsyncIterator[Worker]:
    async with sender_for(fcm, fcm_timeout) as sender:
        yield Worker(
            pool,
            sender,
            batch_size=options.get("batch_size", 100),
            max_attempts=options.get("max_attempts", 5),
            lease=dt.timedelta(seconds=60),
            clock=clock,
        )


async def state_of(db, notification_id) -> tuple[str, int]:
    row = await db.fetchrow("SELECT push_state, attempts FROM notifications WHERE id = $1", notification_id)
    return row["push_state"], row["attempts"]


def data_ids(received) -> list[str]:
    return [r.message["data"]["notification_id"] for r in received]


# ---------------------------------------------------------------- the outbox


async def test_a_rolled_back_change_leaves_no_notification(db):
    user_id = await insert_user(db)
    with pytest.raises(RuntimeError, match="payment failed to record"):
        async with db.transaction():
            await notifications.enqueue(db, user_id, "payment_failed", {"invoice_id": uuid.uuid4()})
            raise RuntimeError("payment failed to record")
    assert await db.fetchval("SELECT count(*) FROM notifications WHERE user_id = $1", user_id) == 0


async def test_enqueue_outside_a_transaction_is_refused(db):
    user_id = await insert_user(db)
    with pytest.raises(RuntimeError, match="inside the transaction"):
        await notifications.enqueue(db, user_id, "payment_failed", {"invoice_id": uuid.uuid4()})


async def test_a_duplicate_dedupe_key_enqueues_nothing(db):
    user_id = await insert_user(db)
    key = f"invoice:{uuid.uuid4()}:paid"
    params = {"invoice_id": uuid.uuid4(), "amount": 50_000}
    first = await notify(db, user_id, "payment_received", params=params, dedupe_key=key)
    second = await notify(db, user_id, "payment_received", params=params, dedupe_key=key)
    assert first is not None and second is None
    assert await db.fetchval("SELECT count(*) FROM notifications WHERE dedupe_key = $1", key) == 1


async def test_concurrent_enqueues_with_one_dedupe_key_make_one_row(pool, db):
    """Payment callbacks arrive twice at once: one receipt."""
    user_id = await insert_user(db)
    key = f"invoice:{uuid.uuid4()}:paid"
    params = {"invoice_id": uuid.uuid4(), "amount": 50_000}

    async def enqueue_once() -> uuid.UUID | None:
        async with pool.acquire() as conn, conn.transaction():
            return await notifications.enqueue(conn, user_id, "payment_received", params, key)

    results = await asyncio.gather(*(enqueue_once() for _ in range(8)))
    assert sum(r is not None for r in results) == 1
    assert await db.fetchval("SELECT count(*) FROM notifications WHERE dedupe_key = $1", key) == 1


# ---------------------------------------------------------------- sending


async def test_a_message_goes_to_every_active_device_in_its_language(pool, db, fcm_clean):
    user_id = await insert_user(db)
    vi_token = await insert_device(db, user_id, locale="vi")
    en_token = await insert_device(db, user_id, locale="en")
    off_token = await insert_device(db, user_id)
    await db.execute("UPDATE devices SET active = false WHERE token = $1", off_token)
    invoice_id = uuid.uuid4()
    notification_id = await notify(
        db, user_id, "payment_received", params={"invoice_id": invoice_id, "amount": 120_000}
    )
    async with worker_for(pool, fcm_clean) as worker:
        await worker.drain()

    [vi] = fcm_clean.sent_to(vi_token)
    [en] = fcm_clean.sent_to(en_token)
    assert fcm_clean.sent_to(off_token) == []
    assert vi.message["notification"] == {
        "title": "Đã nhận thanh toán",
        "body": "Chúng tôi đã nhận 120.000 ₫. Cảm ơn bạn.",
    }
    assert en.message["notification"]["title"] == "Payment received"
    assert en.message["data"] == {
        "kind": "payment_received",
        "notification_id": str(notification_id),
        "invoice_id": str(invoice_id),
    }
    assert await state_of(db, notification_id) == ("sent", 1)
    outcomes = await db.fetch(
        "SELECT outcome, fcm_message_id FROM push_deliveries WHERE notification_id = $1", notification_id
    )
    assert sorted(r["outcome"] for r in outcomes) == ["sent", "sent"]
    assert all(r["fcm_message_id"].startswith("projects/") for r in outcomes)


async def test_a_user_without_devices_still_has_the_message_in_the_inbox(pool, db, fcm_clean):
    user_id = await insert_user(db)
    notification_id = await notify(db, user_id)
    async with worker_for(pool, fcm_clean) as worker:
        await worker.drain()
    assert await state_of(db, notification_id) == ("skipped", 1)
    assert (
        await db.fetchval("SELECT last_error FROM notifications WHERE id = $1", notification_id)
        == "no active device"
    )


@pytest.mark.parametrize("prefix", ["unregistered", "invalid", "mismatch"])
async def test_a_rejected_token_deactivates_its_device_at_once(pool, db, fcm_clean, prefix):
    user_id = await insert_user(db)
    dead_token = await insert_device(db, user_id, f"{prefix}-{uuid.uuid4().hex}")
    good_token = await insert_device(db, user_id)
    first = await notify(db, user_id)
    async with worker_for(pool, fcm_clean) as worker:
        await worker.drain()
        device = await db.fetchrow(
            "SELECT active, deactivated_reason FROM devices WHERE token = $1", dead_token
        )
        assert device["active"] is False and device["deactivated_reason"]
        # The message counts as delivered (the good device got it) and is not retried.
        assert await state_of(db, first) == ("sent", 1)
        second = await notify(db, user_id)
        await worker.drain()
    assert len(fcm_clean.sent_to(good_token)) == 2
    assert data_ids(r for r in fcm_clean.snapshot() if r.token == dead_token) == [str(first)], (
        "no further sends"
    )
    assert await state_of(db, second) == ("sent", 1)


async def test_transient_failures_back_off_then_dead_letter_then_requeue(pool, db, fcm_clean):
    user_id = await insert_user(db)
    token = await insert_device(db, user_id, f"quota-{uuid.uuid4().hex}")
    notification_id = await notify(db, user_id)
    now = utcnow()
    clock = [now]
    async with worker_for(pool, fcm_clean, clock=lambda: clock[0], max_attempts=3) as worker:
        await worker.run_once()
        row = await db.fetchrow(
            "SELECT push_state, attempts, next_attempt_at, last_error FROM notifications WHERE id = $1",
            notification_id,
        )
        assert (row["push_state"], row["attempts"]) == ("pending", 1)
        assert now + dt.timedelta(seconds=2) <= row["next_attempt_at"] <= now + dt.timedelta(seconds=5)
        assert "QuotaExceeded" in row["last_error"]
        # Not due again before the backoff ends.
        await worker.run_once()
        assert await state_of(db, notification_id) == ("pending", 1)
        for _ in range(2):
            clock[0] += dt.timedelta(minutes=20)
            await worker.drain()
        assert await state_of(db, notification_id) == ("dead", 3)
        assert len([r for r in fcm_clean.snapshot() if r.token == token]) == 3

        # Staff requeue it (the route is tested in test_notifications_api.py); FCM is fine again.
        await db.execute("UPDATE devices SET token = $2 WHERE token = $1", token, f"fine-{uuid.uuid4().hex}")
        await db.execute(
            "UPDATE notifications SET push_state = 'pending', attempts = 0, next_attempt_at = $2 WHERE id = $1",
            notification_id,
            clock[0],
        )
        await worker.drain()
    assert await state_of(db, notification_id) == ("sent", 1)


async def test_a_retry_goes_only_to_the_devices_the_last_attempt_missed(pool, db, fcm_clean):
    user_id = await insert_user(db)
    good_token = await insert_device(db, user_id)
    flaky_token = await insert_device(db, user_id, f"quota-{uuid.uuid4().hex}")
    notification_id = await notify(db, user_id)
    clock = [utcnow()]
    async with worker_for(pool, fcm_clean, clock=lambda: clock[0]) as worker:
        await worker.drain()
        assert await state_of(db, notification_id) == ("pending", 1)
        fixed_token = f"fine-{uuid.uuid4().hex}"
        await db.execute("UPDATE devices SET token = $2 WHERE token = $1", flaky_token, fixed_token)
        clock[0] += dt.timedelta(minutes=1)
        await worker.drain()
    assert await state_of(db, notification_id) == ("sent", 2)
    assert data_ids(fcm_clean.sent_to(good_token)) == [str(notification_id)], "not sent to it again"
    assert data_ids(fcm_clean.sent_to(fixed_token)) == [str(notification_id)]
    deliveries = await db.fetch(
        "SELECT attempt, outcome FROM push_deliveries WHERE notification_id = $1", notification_id
    )
    assert sorted((r["attempt"], r["outcome"]) for r in deliveries) == [
        (1, "failed"),
        (1, "sent"),
        (2, "sent"),
    ]


async def test_a_retry_with_no_device_left_is_sent_when_an_earlier_attempt_reached_one(pool, db, fcm_clean):
    user_id = await insert_user(db)
    await insert_device(db, user_id)
    await insert_device(db, user_id, f"quota-{uuid.uuid4().hex}")
    reached, never = await notify(db, user_id), None
    clock = [utcnow()]
    async with worker_for(pool, fcm_clean, clock=lambda: clock[0]) as worker:
        await worker.drain()
        assert await state_of(db, reached) == ("pending", 1)
        await db.execute("UPDATE devices SET active = false WHERE user_id = $1", user_id)  # signed out
        never = await notify(db, user_id)
        clock[0] += dt.timedelta(minutes=1)
        await worker.drain()
    assert await state_of(db, reached) == ("sent", 2)
    assert await state_of(db, never) == ("skipped", 1)


async def test_the_running_worker_keeps_passes_in_parallel_and_sends_each_message_once(
    database_url, pool, db, fcm_clean
):
    users = [await insert_user(db) for _ in range(50)]
    tokens = {u: await insert_device(db, u) for u in users}
    async with worker_for(pool, fcm_clean, batch_size=20) as worker:
        in_flight = most_in_flight = 0
        one_pass = worker.run_once

        async def counted_pass():  # type: ignore[no-untyped-def]
            nonlocal in_flight, most_in_flight
            in_flight += 1
            most_in_flight = max(most_in_flight, in_flight)
            try:
                return await one_pass()
            finally:
                in_flight -= 1

        worker.run_once = counted_pass  # type: ignore[method-assign]
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(database_url, stop, poll_seconds=0.2))
        async with db.transaction():
            ids = [
                await notifications.enqueue(db, users[i % 50], "payment_failed", {"invoice_id": uuid.uuid4()})
                for i in range(400)
            ]
        for _ in range(600):
            done = await db.fetchval(
                "SELECT count(*) FROM notifications WHERE id = ANY($1) AND push_state = 'sent'", ids
            )
            if done == len(ids):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await running
    assert most_in_flight == worker.lanes == 2
    ours = {str(i) for i in ids}
    sent = Counter(i for i in data_ids(fcm_clean.snapshot()) if i in ours)
    assert len(sent) == 400 and set(sent.values()) == {1}
    assert {r.token for r in fcm_clean.snapshot() if r.message["data"]["notification_id"] in ours} == set(
        tokens.values()
    )


async def test_an_fcm_outage_holds_messages_until_it_ends(pool, db, fcm_clean):
    """FCM answers 503 for a minute (on the worker's clock): nothing is dropped, all go out after."""
    users = [await insert_user(db) for _ in range(3)]
    tokens = [await insert_device(db, u) for u in users]
    ids = [await notify(db, u) for u in users]
    start = utcnow()
    clock = [start]
    fcm_clean.outage(503)
    async with worker_for(pool, fcm_clean, clock=lambda: clock[0]) as worker:
        await worker.drain()  # firebase-admin itself retries 503 a few times before giving up
        assert [await state_of(db, i) for i in ids] == [("pending", 1)] * 3
        clock[0] = start + dt.timedelta(seconds=30)
        await worker.drain()
        assert [(await state_of(db, i))[0] for i in ids] == ["pending"] * 3
        fcm_clean.outage(None)
        clock[0] = start + dt.timedelta(seconds=90)
        await worker.drain()
    assert [(await state_of(db, i))[0] for i in ids] == ["sent"] * 3
    assert [len(fcm_clean.sent_to(t)) for t in tokens] == [1, 1, 1]


async def test_quiet_hours_defer_a_push_to_their_end_in_clinic_time(pool, db, fcm_clean):
    user_id = await insert_user(db)
    token = await insert_device(db, user_id)
    await db.execute(
        "INSERT INTO notification_preferences (user_id, quiet_start, quiet_end) VALUES ($1, '22:00', '06:30')",
        user_id,
    )
    notification_id = await notify(db, user_id)
    tomorrow = (utcnow() + dt.timedelta(days=1)).astimezone(CLINIC_TZ).date()
    eleven_pm = dt.datetime.combine(tomorrow, dt.time(23, 0), tzinfo=CLINIC_TZ)
    morning = dt.datetime.combine(tomorrow + dt.timedelta(days=1), dt.time(6, 30), tzinfo=CLINIC_TZ)
    clock = [eleven_pm]
    async with worker_for(pool, fcm_clean, clock=lambda: clock[0]) as worker:
        await worker.drain()
        row = await db.fetchrow(
            "SELECT push_state, attempts, next_attempt_at FROM notifications WHERE id = $1", notification_id
        )
        assert (row["push_state"], row["attempts"], row["next_attempt_at"]) == ("pending", 0, morning)
        assert fcm_clean.sent_to(token) == []
        clock[0] = morning
        await worker.drain()
    assert data_ids(fcm_clean.sent_to(token)) == [str(notification_id)]
    assert await state_of(db, notification_id) == ("sent", 1)


async def test_an_imminent_visit_goes_out_in_quiet_hours_and_a_muted_category_is_inbox_only(
    pool, db, fcm_clean
):
    user_id = await insert_user(db)
    token = await insert_device(db, user_id)
    await db.execute(
        """INSERT INTO notification_preferences (user_id, quiet_start, quiet_end, muted_categories)
           VALUES ($1, '00:00', '23:59', '{appointments,payments}')""",
        user_id,
    )
    params = {"appointment_id": uuid.uuid4(), "start": utcnow() + dt.timedelta(minutes=15)}
    soon = await notify(db, user_id, "appointment_reminder_15m", params=params)
    muted = await notify(db, user_id)
    async with worker_for(pool, fcm_clean) as worker:
        await worker.drain()
    assert data_ids(fcm_clean.sent_to(token)) == [str(soon)]
    assert await state_of(db, muted) == ("skipped", 1)


async def test_a_cancelled_reminder_is_never_sent(pool, db, fcm_clean):
    user_id = await insert_user(db)
    token = await insert_device(db, user_id)
    appointment_id = uuid.uuid4()
    subject = f"appointment:{appointment_id}"
    await notify(
        db,
        user_id,
        "appointment_reminder_24h",
        params={"appointment_id": appointment_id, "start": utcnow() + dt.timedelta(hours=24)},
        subject=subject,
    )
    async with db.transaction():
        await notifications.cancel_pending(db, subject)
    async with worker_for(pool, fcm_clean) as worker:
        await worker.drain()
    assert fcm_clean.sent_to(token) == []


async def test_two_workers_over_a_thousand_messages_send_each_exactly_once(database_url, db, fcm_clean):
    users = [await insert_user(db) for _ in range(100)]
    tokens = {u: await insert_device(db, u) for u in users}
    async with db.transaction():
        ids = [
            await notifications.enqueue(db, users[i % 100], "payment_failed", {"invoice_id": uuid.uuid4()})
            for i in range(1000)
        ]
    pools = [await create_pool(database_url, min_size=1, max_size=2) for _ in range(2)]
    try:
        async with (
            worker_for(pools[0], fcm_clean, batch_size=50) as first,
            worker_for(pools[1], fcm_clean, batch_size=50) as second,
        ):
            done = await asyncio.gather(first.drain(), second.drain())
    finally:
        for pool in pools:
            await pool.close()
    ours = {str(i) for i in ids}
    sent = Counter(i for i in data_ids(fcm_clean.snapshot()) if i in ours)
    assert len(sent) == 1000 and set(sent.values()) == {1}
    assert done[0].pushed > 0 and done[1].pushed > 0, "both workers took a share"
    states = await db.fetch(
        "SELECT push_state, count(*) FROM notifications WHERE id = ANY($1) GROUP BY 1", ids
    )
    assert [(r["push_state"], r["count"]) for r in states] == [("sent", 1000)]
    assert {r.token for r in fcm_clean.snapshot() if r.message["data"]["notification_id"] in ours} == set(
        tokens.values()
    )


def worker_process(database_url: str, account: Path, fcm: FcmEmulator) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TELEHEALTH_ENV": "dev",
        "DATABASE_URL": database_url,
        "FCM_CREDENTIALS_FILE": str(account),
        "FCM_ENDPOINT": fcm.send_url,
        "NOTIFICATION_LEASE_SECONDS": "2",
        "NOTIFICATION_POLL_SECONDS": "0.2",
        "LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([sys.executable, "-m", "api.cli", "worker"], env=env, cwd=ROOT)


async def test_a_worker_killed_between_sending_and_recording_sends_once_more_never_zero(
    database_url, db, fcm_clean, tmp_path
):
    user_id = await insert_user(db)
    token = await insert_device(db, user_id)
    account = fcm_clean.write_service_account(tmp_path / "service-account.json")
    fcm_clean.hold()  # FCM takes the message but the answer never reaches the first worker
    first = worker_process(database_url, account, fcm_clean)
    try:
        notification_id = await notify(db, user_id)
        await fcm_clean.wait_for(lambda e: any(r.token == token for r in e.snapshot()), timeout=30)
        first.kill()
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    fcm_clean.release()
    assert await state_of(db, notification_id) == ("pending", 1)
    assert (
        await db.fetchval("SELECT count(*) FROM push_deliveries WHERE notification_id = $1", notification_id)
        == 0
    )

    second = worker_process(database_url, account, fcm_clean)
    try:
        for _ in range(300):
            if (await state_of(db, notification_id))[0] == "sent":
                break
            await asyncio.sleep(0.05)
        second.terminate()
        assert second.wait(timeout=20) == 0, "SIGTERM ends the worker cleanly"
    finally:
        if second.poll() is None:
            second.kill()
    assert await state_of(db, notification_id) == ("sent", 2)
    assert data_ids(fcm_clean.sent_to(token)) == [str(notification_id)] * 2, "sent again once, not lost"
    deliveries = await db.fetch(
        "SELECT attempt, outcome FROM push_deliveries WHERE notification_id = $1", notification_id
    )
    assert [(r["attempt"], r["outcome"]) for r in deliveries] == [(2, "sent")]


async def test_the_api_process_runs_the_worker_in_dev(
    database_url, redis_url, issuer, db, fcm_clean, tmp_path
):
    """The dev default: the same worker inside the API process, woken by the enqueue's commit."""
    settings = pushing_in_process(make_settings(database_url, redis_url, issuer), fcm_clean, tmp_path)
    user_id = await insert_user(db)
    token = await insert_device(db, user_id)
    async with serve(settings) as http:
        assert (await http.get("/health/ready")).status_code == 200
        await asyncio.sleep(0.5)  # the worker's first pass is done; now it waits
        notification_id = await notify(db, user_id)
        await fcm_clean.wait_for(lambda e: bool(e.sent_to(token)), timeout=10)
    assert data_ids(fcm_clean.sent_to(token)) == [str(notification_id)]


async def test_a_message_no_template_can_render_is_dead_lettered_alone(pool, db, fcm_clean):
    user_id = await insert_user(db)
    token = await insert_device(db, user_id)
    broken, fine = await notify(db, user_id), await notify(db, user_id)
    await db.execute("UPDATE notifications SET params = '{}' WHERE id = $1", broken)
    async with worker_for(pool, fcm_clean) as worker:
        await worker.drain()
    assert await state_of(db, broken) == ("dead", 1)
    assert "cannot render" in await db.fetchval("SELECT last_error FROM notifications WHERE id = $1", broken)
    assert data_ids(fcm_clean.sent_to(token)) == [str(fine)]


async def test_a_slow_fcm_answer_times_out_and_is_retried_without_holding_others_back(pool, db, fcm_clean):
    fcm_clean.slow_seconds = 3.0
    slow_user, quick_user = await insert_user(db), await insert_user(db)
    await insert_device(db, slow_user, f"slow-{uuid.uuid4().hex}")
    quick_token = await insert_device(db, quick_user)
    slow, quick = await notify(db, slow_user), await notify(db, quick_user)
    async with worker_for(pool, fcm_clean, fcm_timeout=1) as worker:
        await worker.drain()
    assert data_ids(fcm_clean.sent_to(quick_token)) == [str(quick)]
    assert await state_of(db, quick) == ("sent", 1)
    assert await state_of(db, slow) == ("pending", 1), "a timeout is transient: retried later"
    assert "Deadline" in await db.fetchval("SELECT last_error FROM notifications WHERE id = $1", slow)


async def test_a_device_deleted_while_its_push_is_in_flight_does_not_lose_the_batch(pool, db, fcm_clean):
    user_id = await insert_user(db)
    token = await insert_device(db, user_id)
    other_user = await insert_user(db)
    other_token = await insert_device(db, other_user)
    mine, theirs = await notify(db, user_id), await notify(db, other_user)
    fcm_clean.hold()
    async with worker_for(pool, fcm_clean) as worker:
        running = asyncio.create_task(worker.run_once())
        await fcm_clean.wait_for(lambda e: len({r.token for r in e.snapshot()} & {token, other_token}) == 2)
        await db.execute("DELETE FROM devices WHERE token = $1", token)
        fcm_clean.release()
        await running
    assert await state_of(db, mine) == ("sent", 1)
    assert await state_of(db, theirs) == ("sent", 1)


async def test_a_revoked_access_token_fails_one_pass_and_the_next_gets_a_new_one(pool, db, fcm_clean):
    user_id = await insert_user(db)
    token = await insert_device(db, user_id)
    await notify(db, user_id)
    clock = [utcnow()]
    async with worker_for(pool, fcm_clean, clock=lambda: clock[0]) as worker:
        await worker.drain()  # signs in to FCM (the OAuth exchange) and sends the first
        exchanges = fcm_clean.token_exchanges
        fcm_clean.revoke_tokens()
        notification_id = await notify(db, user_id)
        clock[0] = utcnow()
        await worker.drain()
        assert await state_of(db, notification_id) == ("pending", 1)
        clock[0] += dt.timedelta(minutes=1)
        await worker.drain()
    assert await state_of(db, notification_id) == ("sent", 2)
    assert fcm_clean.token_exchanges == exchanges + 1
    assert data_ids(fcm_clean.sent_to(token))[1:] == [str(notification_id)]
