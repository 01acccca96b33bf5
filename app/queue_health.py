"""The queue's health for ``/readyz`` and ``GET /v1/workers``, read without the thread pool.

Health probes must answer while every inference thread is busy, so this reads Redis with the
asyncio client on the event loop itself, bounded by a short timeout: a stalled or absent Redis
makes the answer ``unreachable`` within that bound, never a wait.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
import redis.asyncio as aioredis

from workers.jobqueue import WORKER_BEATS, WORKERS, heartbeat_ttl, queue_key, workers_from
from workers.settings import CoreSettings

PROBE_TIMEOUT_S = 0.5


class QueueHealth:
    """Redis reachability, queue depth and the workers' liveness, each probe within ``PROBE_TIMEOUT_S``."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self._client: aioredis.Redis | None = None

    def _redis(self) -> aioredis.Redis:
        if self._client is None:  # created on first use, inside the serving event loop
            self._client = aioredis.Redis.from_url(self.settings.redis_url or "", socket_timeout=PROBE_TIMEOUT_S,
                                                   socket_connect_timeout=PROBE_TIMEOUT_S)
        return self._client

    async def check(self) -> dict[str, Any]:
        """``{status: ok, queued, workers: {alive, busy, list}}`` or ``{status: unreachable}``."""
        try:
            async with asyncio.timeout(2 * PROBE_TIMEOUT_S):
                async with self._redis().pipeline(transaction=False) as pipe:
                    pipe.time()
                    pipe.llen(queue_key(self.settings.queue_name))
                    pipe.zrange(WORKER_BEATS, 0, -1, withscores=True)
                    pipe.hgetall(WORKERS)
                    (seconds, micros), queued, beats, infos = await pipe.execute()
        except (redis.RedisError, OSError, TimeoutError):
            await self._reset()
            return {"status": "unreachable"}
        listed = workers_from(seconds + micros / 1e6, beats, infos, heartbeat_ttl(self.settings.worker_heartbeat_s))
        alive = [worker for worker in listed if worker["alive"]]
        return {"status": "ok", "queued": int(queued),
                "workers": {"alive": len(alive), "busy": sum(1 for w in alive if w.get("state") == "busy"),
                            "list": listed}}

    async def _reset(self) -> None:
        """Drop the client after a failure, so a half-read connection is never reused."""
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:
                pass
