"""A lazily created asyncio Redis client with short timeouts, dropped after any failure.

The API's event-loop readers (the health probe, the rate limiter) share this shape: the client
is created on first use, inside the serving event loop, and thrown away after a failure so that
a half-read connection is never reused; the next call reconnects.
"""

from __future__ import annotations

import redis.asyncio as aioredis


class LazyAsyncRedis:
    """One asyncio client for ``url``, (re)created on demand."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client: aioredis.Redis | None = None

    def client(self) -> aioredis.Redis:
        if self._client is None:
            self._client = aioredis.Redis.from_url(self.url, socket_timeout=self.timeout_s,
                                                   socket_connect_timeout=self.timeout_s)
        return self._client

    async def reset(self) -> None:
        """Close and forget the client (errors while closing a broken connection are moot)."""
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:
                pass
