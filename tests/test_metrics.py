"""Request metrics: counted per method, route template and status; 5xx counted as errors."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from api.metrics import RequestMetricsMiddleware, metrics_config


def sample(name: str, **labels: Any) -> float:
    value = REGISTRY.get_sample_value(f"telehealth_{name}", {"app_name": "telehealth", **labels})
    return value or 0.0


def answering(status: int) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        # While the request runs, it is in progress.
        assert (
            sample("requests_in_progress", method="GET", path=scope["path_template"], status_code="200") == 1
        )
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


async def call(status: int, template: str) -> None:
    middleware = RequestMetricsMiddleware(answering(status), metrics_config())
    scope = {"type": "http", "method": "GET", "path": "/v1/x/123", "path_template": template, "headers": []}

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    await middleware(scope, receive, send)  # type: ignore[arg-type]


async def test_requests_are_counted_by_route_template_and_status() -> None:
    labels = {"method": "GET", "path": "/v1/metrics-test/{id}"}
    before_ok = sample("requests_total", status_code="200", **labels)
    before_failed = sample("requests_total", status_code="503", **labels)
    before_timed = sample("request_duration_seconds_count", status_code="200", **labels)
    before_errors = sample("requests_error_total", status_code="503", **labels)

    for _ in range(3):
        await call(200, labels["path"])
    await call(503, labels["path"])

    assert sample("requests_total", status_code="200", **labels) == before_ok + 3
    assert sample("requests_total", status_code="503", **labels) == before_failed + 1
    assert sample("request_duration_seconds_count", status_code="200", **labels) == before_timed + 3
    assert sample("requests_error_total", status_code="503", **labels) == before_errors + 1
    assert sample("requests_error_total", status_code="200", **labels) == 0
    assert sample("requests_in_progress", status_code="200", **labels) == 0
