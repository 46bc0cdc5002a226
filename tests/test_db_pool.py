"""The connection pool every request goes through (api/db.py, FairPool): turns in arrival order,
never more connections than its size, and no connection handed on in a state the next user
would trip over (a transaction left open, a query cancelled midway, a killed backend)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from api.db import FairPool, create_pool

SIZE = 3


@pytest.fixture
async def small_pool(database_url: str) -> AsyncIterator[FairPool]:
    pool = await create_pool(database_url, min_size=1, max_size=SIZE)
    yield pool
    await asyncio.wait_for(pool.close(), timeout=10)


async def backend_pid(pool: FairPool) -> int:
    async with pool.acquire() as conn:
        return int(await conn.fetchval("SELECT pg_backend_pid()"))


async def test_waiters_get_their_turn_in_arrival_order(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1)
    order: list[int] = []
    try:
        async with pool.acquire():
            tasks = []
            for n in range(20):
                tasks.append(asyncio.create_task(_take_turn(pool, n, order)))
                await asyncio.sleep(0)  # each one queued before the next arrives
        await asyncio.gather(*tasks)
    finally:
        await pool.close()
    assert order == list(range(20))


async def _take_turn(pool: FairPool, n: int, order: list[int]) -> None:
    async with pool.acquire() as conn:
        order.append(n)
        await conn.fetchval("SELECT 1")


async def test_many_concurrent_users_share_at_most_size_connections(small_pool: FairPool) -> None:
    in_use = 0
    most = 0
    pids: set[int] = set()

    async def user() -> None:
        nonlocal in_use, most
        async with small_pool.acquire() as conn:
            in_use += 1
            most = max(most, in_use)
            pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
            await asyncio.sleep(0.001)
            in_use -= 1

    await asyncio.gather(*(user() for _ in range(300)))
    assert most == SIZE
    assert len(pids) <= SIZE


async def test_a_transaction_left_open_is_not_handed_on(small_pool: FairPool) -> None:
    async with small_pool.acquire() as conn:
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE left_open (x int)")
    for _ in range(SIZE + 1):
        async with small_pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('left_open')") is None  # rolled back


async def test_a_query_cancelled_midway_does_not_break_the_next_user(small_pool: FairPool) -> None:
    started = asyncio.Event()

    async def slow() -> None:
        async with small_pool.acquire() as conn:
            started.set()
            await conn.execute("SELECT pg_sleep(30)")

    task = asyncio.create_task(slow())
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    answers = await asyncio.gather(*(_select_one(small_pool) for _ in range(SIZE * 4)))
    assert answers == [1] * (SIZE * 4)


async def _select_one(pool: FairPool) -> int:
    async with pool.acquire() as conn:
        return int(await conn.fetchval("SELECT 1"))


async def test_a_waiter_cancelled_in_the_queue_does_not_lose_a_connection(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire():
            gone = asyncio.create_task(_select_one(pool))
            await asyncio.sleep(0.01)
            gone.cancel()
            after = asyncio.create_task(_select_one(pool))
            await asyncio.sleep(0.01)
        assert await asyncio.wait_for(after, timeout=5) == 1
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert await asyncio.wait_for(_select_one(pool), timeout=5) == 1
    finally:
        await pool.close()


async def test_a_killed_backend_fails_its_user_once_then_is_replaced(
    small_pool: FairPool, db: asyncpg.Connection
) -> None:
    pid = await backend_pid(small_pool)  # idle now, the next to be handed out
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
    await asyncio.sleep(0.1)
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
        async with small_pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
            await conn.fetchval("SELECT 1")
    answers = await asyncio.gather(*(_select_one(small_pool) for _ in range(SIZE * 4)))
    assert answers == [1] * (SIZE * 4)
    assert pid not in {await backend_pid(small_pool) for _ in range(SIZE)}


async def test_a_freed_place_promised_to_a_waiter_is_not_taken_by_a_newcomer(database_url: str) -> None:
    """A connection dropped after an error frees its place for the first waiter; a request that
    arrives before that waiter runs must queue behind it, not fill the same place (both used to
    fill it: one waited for asyncpg forever, and the pool's count of free places went negative)."""
    pool = await create_pool(database_url, min_size=1, max_size=1)
    go = asyncio.Event()

    async def newcomer() -> None:
        await go.wait()  # woken just before the waiter below is handed the freed place
        await _take_turn(pool, 2, order)

    order: list[int] = []
    try:
        late = asyncio.create_task(newcomer())
        with pytest.raises(ZeroDivisionError):
            async with pool.acquire():
                waiter = asyncio.create_task(_take_turn(pool, 1, order))
                await asyncio.sleep(0)  # queued for the only connection
                go.set()
                raise ZeroDivisionError  # the connection goes back to asyncpg: a freed place
        await asyncio.wait_for(asyncio.gather(waiter, late), timeout=10)
    finally:
        await asyncio.wait_for(pool.close(), timeout=10)
    assert order == [1, 2]
