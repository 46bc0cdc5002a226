"""The published contract, fuzzed: schemathesis generates requests from `openapi/openapi.json`
and sends them in-process to the app, with the token of a demo person who is a citizen and the
administrator of a demo facility, so role-gated routes are reached as well as refused. Every
answer must not be a 5xx, must have a status code and content type the document declares for
that operation, and a body that matches its schema.

The app gets a database of its own: generated requests create services, schedules and staff.
schemathesis's own pytest plugin does not run under pytest 9, so each operation is a plain
parametrized test that runs its hypothesis strategy.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from litestar import Litestar
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app
from api.identity.tokens import issue_access_token
from api.settings import Settings
from tests.conftest import drop_database, fresh_database, make_settings

DOCUMENT = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
ADMIN = "011078000201"  # the demo administrator of BVDK-DB (api/demo/dien_bien.py)
PUBLISHED = schemathesis.openapi.from_dict(json.loads(DOCUMENT.read_text()))
OPERATIONS = {op.label: op for op in (result.ok() for result in PUBLISHED.get_all_operations())}


@pytest.fixture(scope="module")
async def contract_settings(server_url: str, redis_url: str, issuer: Any) -> AsyncIterator[Settings]:
    url = await fresh_database(server_url)
    yield make_settings(url, redis_url, issuer, booking_rate_per_minute=100_000)
    await drop_database(server_url, url)


@pytest.fixture(scope="module")
async def admin_id(contract_settings: Settings) -> Any:
    conn = await asyncpg.connect(contract_settings.database_url)
    try:
        # As a sign-in would leave them (the staff table names the person before their first sign-in).
        return await conn.fetchval(
            """INSERT INTO users (personal_id, full_name, birthdate, sex)
               VALUES ($1, 'Quản Trị Viên', '1978-01-01', 'male') RETURNING id""",
            ADMIN,
        )
    finally:
        await conn.close()


@pytest.fixture
async def admin_headers(contract_settings: Settings, admin_id: Any) -> dict[str, str]:
    """A session of its own for each operation: fuzzing POST /v1/auth/logout ends the one it is given."""
    conn = await asyncpg.connect(contract_settings.database_url)
    try:
        session_id = await conn.fetchval(
            "INSERT INTO auth_sessions (user_id) VALUES ($1) RETURNING id", admin_id
        )
    finally:
        await conn.close()
    token = issue_access_token(contract_settings, user_id=admin_id, session_id=session_id)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def contract_app(contract_settings: Settings) -> Iterator[Litestar]:
    # The operations were read before the app existed: each call names it, and the schema's own
    # probes (a request without the token, to check that it is refused) find it here.
    PUBLISHED.app = create_app(contract_settings)
    yield PUBLISHED.app
    PUBLISHED.app = None


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_the_operation_keeps_the_published_contract(
    label: str, contract_app: Litestar, admin_headers: dict[str, str]
) -> None:
    @given(case=OPERATIONS[label].as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def run(case: Any) -> None:
        case.call_and_validate(
            base_url="http://testserver.local",
            headers=admin_headers,
            app=contract_app,
            # A request the schema allows may still break a rule no schema states (a start that is not a
            # free slot, a personal ID whose check digits are wrong): a 4xx for those is right.
            excluded_checks=[positive_data_acceptance],
        )

    run()
