"""Request metrics for Prometheus (served at `/metrics`, merged across workers)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from litestar.plugins.prometheus import PrometheusConfig, PrometheusMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send


class RequestMetricsMiddleware(PrometheusMiddleware):
    """Litestar's Prometheus middleware: the same four metrics with the same labels (method, route
    template, status code, app name), recorded with less work per request.

    Litestar's version builds a `Request` and its parsed URL, a label dict and four label
    lookups under a lock for every request: about 8 % of a worker's CPU on `GET /v1/me`
    (bench/README.md). This one reads the scope and keeps each label combination's metric
    children. It supports only what `metrics_config` sets (no extra labels, exemplars or
    excluded methods).
    """

    def __init__(self, app: ASGIApp, config: PrometheusConfig) -> None:
        if config.labels or config.exemplars or config.excluded_http_methods or not config.group_path:
            raise ValueError("RequestMetricsMiddleware supports only metrics_config()'s settings")
        super().__init__(app, config)
        self._in_progress: dict[tuple[str, str], Any] = {}
        self._finished: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = str(scope.get("method") or scope["type"])
        route = scope["path_template"]
        in_progress = self._in_progress.get((method, route))
        if in_progress is None:
            in_progress = self._in_progress[method, route] = self._child(
                self.requests_in_progress, method, route, 200
            )
        started = time.perf_counter()
        finished: float | None = None  # when the body went out
        status = 200

        async def send_observed(message: Message) -> None:
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                finished = time.perf_counter()
            await send(message)

        in_progress.inc()
        try:
            await self.app(scope, receive, send_observed)
        finally:
            in_progress.dec()
            count, duration, errors = self._children(method, route, status)
            count.inc()
            duration.observe((finished or time.perf_counter()) - started)
            if errors is not None:
                errors.inc()

    def _children(self, method: str, route: str, status: int) -> tuple[Any, Any, Any]:
        key = (method, route, status)
        children = self._finished.get(key)
        if children is None:
            children = self._finished[key] = (
                self._child(self.request_count, method, route, status),
                self._child(self.request_time, method, route, status),
                self._child(self.requests_error_count, method, route, status) if status >= 500 else None,
            )
        return children

    def _child(self, metric: Callable[[dict[str, Any]], Any], method: str, route: str, status: int) -> Any:
        """`metric`'s child for these labels (the metric is registered on first use, as Litestar does)."""
        labels = {"method": method, "path": route, "status_code": status, "app_name": self._config.app_name}
        return metric(labels).labels(*labels.values())


def metrics_config() -> PrometheusConfig:
    return PrometheusConfig(
        app_name="telehealth", prefix="telehealth", group_path=True, middleware_class=RequestMetricsMiddleware
    )
