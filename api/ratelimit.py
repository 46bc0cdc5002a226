"""Fixed-window rate limits for sign-in, refresh, booking and payment creation, shared across workers through Redis.

Litestar's `RateLimitConfig` keeps one bucket per client for all routes and is not atomic
across workers, so the limits that guard credentials are counted here: `INCR` + `EXPIRE`
in one Redis transaction, or a per-process counter when the app runs without Redis.
"""

from __future__ import annotations

import time
from typing import Any

from litestar.connection import ASGIConnection
from redis.asyncio import Redis

from api.errors import ApiError


def client_ip(request: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The caller's address as the server saw it (behind a proxy, configure its forwarded headers)."""
    return request.client.host if request.client else "unknown"


class RateLimiter:
    def __init__(self, redis: Redis | None) -> None:
        self._redis = redis
        self._local: dict[str, int] = {}

    async def hit(self, name: str, subject: str, *, limit: int, window: int = 60) -> None:
        """Count one attempt; raise 429 `rate_limited` with `Retry-After` past `limit` per window."""
        now = int(time.time())
        window_start = now - now % window
        key = f"ratelimit:{name}:{subject}:{window_start}"
        if self._redis is not None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, window + 1)
                count, _ = await pipe.execute()
        else:
            if len(self._local) > 100_000:
                self._local = {k: v for k, v in self._local.items() if k.endswith(f":{window_start}")}
            count = self._local[key] = self._local.get(key, 0) + 1
        if count > limit:
            retry_after = window_start + window - now
            raise ApiError("rate_limited", headers={"Retry-After": str(max(retry_after, 1))})

    async def hit_user_and_address(
        self, name: str, request: ASGIConnection[Any, Any, Any, Any], *, per_user: int, per_address: int
    ) -> None:
        """A signed-in caller's attempt, counted per user and per address (many accounts, one address)."""
        await self.hit(name, str(request.user.id), limit=per_user)
        await self.hit(f"{name}:address", client_ip(request), limit=per_address)
