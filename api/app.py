"""The Litestar application: plugins, middleware, routes and the resources they share."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager

import httpx
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from api.booking.availability import AvailabilityCache
from api.booking.routes import AppointmentController, AvailabilityController, WaitlistController
from api.booking.schedule_cache import ScheduleCache
from api.booking.staff_routes import StaffAppointmentController, StaffScheduleController
from api.db import create_pool, provide_db
from api.directory.admin_routes import FacilityAdminController
from api.directory.routes import DoctorController, FacilityController
from api.errors import problem_details_plugin
from api.health import HealthController, MetricsController, dev_issuer_jwks
from api.identity.current_user import BearerAuthenticationMiddleware
from api.identity.routes import AuthController, MeController
from api.identity.tokens import VerifiedTokens
from api.identity.vneid import VneidVerifier
from api.metrics import metrics_config
from api.notifications.routes import (
    DeadLetterController,
    DeviceController,
    InboxController,
    PreferencesController,
)
from api.observability import RequestContextMiddleware, configure_logging
from api.payments.routes import CallbackController, InvoiceController
from api.payments.staff_routes import StaffRefundController
from api.ratelimit import RateLimiter
from api.settings import Settings, SettingsError, load_settings
from notifications.outbox import Waker
from realtime.fanout import channels_plugin

API_DESCRIPTION = """Backend of the Điện Biên telehealth app.

Errors are RFC 9457 problem details with a stable `code` and a message in the caller's
`Accept-Language` (`vi` default, `en`). Lists are cursor-paginated (`limit`, `cursor` →
`next_cursor`). Authenticate with `Authorization: Bearer <access token>` from
`POST /v1/auth/vneid`.
"""


def _redis_client(settings: Settings) -> Redis | None:
    """One client per process. Its pool waits for a free connection: redis-py's default pool
    raises `Too many connections` past 100, which a burst of requests (200 patients booking at
    once) turned into 500s."""
    if not settings.redis_url:
        return None
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=64,
        timeout=settings.outbound_timeout_seconds,
        retry=Retry(ExponentialBackoff(cap=2, base=0.05), retries=5),
        socket_timeout=settings.outbound_timeout_seconds,
        socket_connect_timeout=settings.outbound_timeout_seconds,
        health_check_interval=15,
    )
    return Redis.from_pool(pool)


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or load_settings()
    redis = _redis_client(settings)

    @asynccontextmanager
    async def resources(app: Litestar) -> AsyncGenerator[None, None]:
        if not settings.database_url:
            raise SettingsError(
                "DATABASE_URL: not set (start with `telehealth serve` for the embedded database)"
            )
        app.state.db_pool = await create_pool(
            settings.database_url, min_size=settings.db_pool_min, max_size=settings.db_pool_max
        )
        # Booking's per-process caches, checked against versions the database keeps.
        app.state.availability = AvailabilityCache(app.state.db_pool)
        app.state.booking_schedules = ScheduleCache(app.state.db_pool)
        # Calls to payment providers: one pooled client, short timeouts.
        app.state.http = httpx.AsyncClient(timeout=settings.outbound_timeout_seconds)
        # Wakes the notification workers after commits that enqueue without a NOTIFY of their own.
        app.state.outbox_waker = Waker(settings.database_url)
        try:
            if settings.worker_in_process:
                from notifications.runner import running_worker  # firebase-admin only where it is used

                async with running_worker(settings, app.state.db_pool):
                    yield
            else:
                yield
        finally:
            await app.state.outbox_waker.close()
            await app.state.http.aclose()
            await app.state.db_pool.close()
            if redis is not None:
                await redis.aclose()

    route_handlers: list[object] = [
        HealthController,
        MetricsController,
        AuthController,
        MeController,
        FacilityController,
        DoctorController,
        FacilityAdminController,
        DeviceController,
        InboxController,
        PreferencesController,
        DeadLetterController,
        AvailabilityController,
        AppointmentController,
        WaitlistController,
        StaffScheduleController,
        StaffAppointmentController,
        InvoiceController,
        CallbackController,
        StaffRefundController,
    ]
    if settings.dev_issuer_enabled:
        route_handlers.append(dev_issuer_jwks)

    configure_logging(settings.log_level)
    app = Litestar(
        route_handlers=route_handlers,  # type: ignore[arg-type]
        lifespan=[resources],
        dependencies={"db": Provide(provide_db)},
        middleware=[
            metrics_config().middleware,
            DefineMiddleware(BearerAuthenticationMiddleware),
        ],
        plugins=[problem_details_plugin(), channels_plugin(redis)],
        state=State(
            {
                "settings": settings,
                "redis": redis,
                "rate_limiter": RateLimiter(redis),
                "verified_tokens": VerifiedTokens(),
                "vneid_verifier": VneidVerifier(
                    settings.vneid, leeway=settings.vneid_leeway, timeout=settings.outbound_timeout_seconds
                ),
            }
        ),
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Telehealth API",
            version="1",
            description=API_DESCRIPTION,
            path="/docs",
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT")}
            ),
            render_plugins=[ScalarRenderPlugin()],
        ),
        logging_config=None,  # ours: JSON lines with redaction (api/observability.py)
        debug=False,
    )
    # Around the router, not a route: unmatched paths get a request id and security headers too.
    app.asgi_handler = RequestContextMiddleware(app.asgi_handler, hsts=not settings.is_dev)
    return app
