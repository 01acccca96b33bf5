"""The queue's health for ``/readyz`` and ``GET /v1/workers``, read without the thread pool.

Health probes must answer while every inference thread is busy, so this reads Redis with the
asyncio client on the event loop itself, bounded by a short timeout: a stalled or absent Redis
makes the answer ``unreachable`` within that bound, never a wait.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from app.async_redis import LazyAsyncRedis
from workers.jobqueue import WORKER_BEATS, WORKERS, heartbeat_ttl, queue_key, workers_from
from core.settings import CoreSettings

PROBE_TIMEOUT_S = 0.5


class QueueHealth:
    """Redis reachability, queue depth and the workers' liveness, each probe within ``PROBE_TIMEOUT_S``."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self.connection = LazyAsyncRedis(settings.redis_url or "", PROBE_TIMEOUT_S)

    async def check(self) -> dict[str, Any]:
        """``{status: ok, queued, workers: {alive, busy, list}}`` or ``{status: unreachable}``."""
        try:
            async with asyncio.timeout(2 * PROBE_TIMEOUT_S):
                async with self.connection.client().pipeline(transaction=False) as pipe:
                    pipe.time()
                    pipe.llen(queue_key(self.settings.queue_name))
                    pipe.zrange(WORKER_BEATS, 0, -1, withscores=True)
                    pipe.hgetall(WORKERS)
                    (seconds, micros), queued, beats, infos = await pipe.execute()
        except (redis.RedisError, OSError, TimeoutError):
            await self.connection.reset()
            return {"status": "unreachable"}
        listed = workers_from(seconds + micros / 1e6, beats, infos, heartbeat_ttl(self.settings.worker_heartbeat_s))
        alive = [worker for worker in listed if worker["alive"]]
        return {"status": "ok", "queued": int(queued),
                "workers": {"alive": len(alive), "busy": sum(1 for w in alive if w.get("state") == "busy"),
                            "list": listed}}
