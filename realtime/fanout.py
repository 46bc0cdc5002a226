"""Fan-out of events between API processes: Redis pub/sub when configured, in-process otherwise.

Built on Litestar's channels plugin. One process alone (the embedded default) needs no
Redis; several processes behind a load balancer share events through Redis.
"""

from __future__ import annotations

from litestar.channels import ChannelsPlugin
from litestar.channels.backends.memory import MemoryChannelsBackend
from litestar.channels.backends.redis import RedisChannelsPubSubBackend
from redis.asyncio import Redis


def channels_plugin(redis: Redis | None) -> ChannelsPlugin:
    backend = (
        RedisChannelsPubSubBackend(redis=redis, key_prefix="telehealth")
        if redis is not None
        else MemoryChannelsBackend()
    )
    return ChannelsPlugin(backend=backend, arbitrary_channels_allowed=True)
