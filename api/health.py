"""Liveness, readiness (database and Redis), and the dev issuer's JWKS."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import msgspec
from litestar import Controller, get
from litestar.datastructures import State
from litestar.plugins.prometheus import PrometheusController
from litestar.response import Response

from api.errors import error_responses
from api.identity.dev_issuer import public_jwks


class Check(msgspec.Struct):
    status: Literal["ok", "down"]
    database: Literal["ok", "down"] | None = None
    redis: Literal["ok", "down", "not_configured"] | None = None


class HealthController(Controller):
    path = "/health"
    tags = ["operations"]

    @get("/live", operation_id="live", summary="The process is up", responses=error_responses())
    async def live(self) -> Check:
        return Check(status="ok")

    @get(
        "/ready",
        operation_id="ready",
        summary="The database and, when configured, Redis answer",
        responses=error_responses("service_unavailable"),
    )
    async def ready(self, state: State) -> Response[Check]:
        database = await _probe(_select_one(state))
        redis = "not_configured" if state.redis is None else await _probe(state.redis.ping())
        ok = database == "ok" and redis != "down"
        return Response(
            Check(status="ok" if ok else "down", database=database, redis=redis),  # type: ignore[arg-type]
            status_code=200 if ok else 503,
        )


class MetricsController(PrometheusController):
    """Prometheus metrics, merged across workers; operational, so not part of the public API document."""

    include_in_schema = False


async def _select_one(state: State) -> None:
    async with state.db_pool.acquire() as conn:
        await conn.fetchval("SELECT 1")


async def _probe(check: Any) -> str:
    try:
        await asyncio.wait_for(check, timeout=2)
    except Exception:  # any failure means not ready; the reason is not the caller's business
        return "down"
    return "ok"


@get("/dev/vneid/jwks.json", operation_id="devIssuerJwks", summary="Dev issuer keys", include_in_schema=False)
async def dev_issuer_jwks(state: State) -> dict[str, Any]:
    return public_jwks(state.settings)
