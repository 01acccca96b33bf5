"""Requests-per-minute limits on the synchronous routes, exact across API processes.

A generic cell rate algorithm (GCRA) per caller: each request moves the caller's "theoretical
arrival time" one interval (60 s / limit) on; a request that would put it more than a minute
ahead of now is refused. So a caller may burst its whole minute's quota at once and then gets
one request per interval, with no window edges to game. The state is one Redis key per caller
updated by a script on Redis's clock, so every API process counts the same requests; when
Redis is absent or away, each process counts on its own (limits are then per process) rather
than refusing service.

Answers carry the IETF ``RateLimit-Policy`` / ``RateLimit`` headers
(draft-ietf-httpapi-ratelimit-headers); a refusal is 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass

import redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.async_redis import LazyAsyncRedis
from app.auth import Principal
from app.errors import error_response
from workers.payload import KEY_PREFIX

logger = logging.getLogger("unbox.rate_limits")

WINDOW_S = 60.0
POLICY = "per-minute"
LIMITED_ROUTES = frozenset({("POST", "/v1/predict"), ("POST", "/v1/explain")})
REDIS_TIMEOUT_S = 0.25

# KEYS: the caller's arrival-time key. ARGV: limit, window s.
# Returns {allowed 1/0, remaining, seconds until a request is allowed, seconds until the quota is full}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local interval = window / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local after = tat + interval
if after - now > window then
  return {0, 0, tostring(after - now - window), tostring(tat - now)}
end
redis.call('SET', KEYS[1], tostring(after), 'PX', math.ceil((after - now) * 1000))
return {1, math.floor((window - (after - now)) / interval), '0', tostring(after - now)}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float
    reset_s: float

    def headers(self) -> dict[str, str]:
        """``RateLimit-Policy`` and ``RateLimit`` (and ``Retry-After`` when refused)."""
        headers = {"RateLimit-Policy": f'"{POLICY}";q={self.limit};w={int(WINDOW_S)}',
                   "RateLimit": f'"{POLICY}";r={self.remaining};t={math.ceil(self.reset_s)}'}
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


def gcra(arrival: float, now: float, limit: int) -> tuple[Decision, float]:
    """The same rule as the script, for one process: the decision and the new arrival time."""
    interval = WINDOW_S / limit
    arrival = max(arrival, now)
    after = arrival + interval
    if after - now > WINDOW_S:
        return Decision(False, limit, 0, after - now - WINDOW_S, arrival - now), arrival
    return Decision(True, limit, math.floor((WINDOW_S - (after - now)) / interval), 0.0, after - now), after


class LocalLimiter:
    """Per-process arrival times: the fallback while Redis cannot be reached."""

    def __init__(self) -> None:
        self._arrivals: dict[str, float] = {}
        self._lock = threading.Lock()

    def decide(self, client: str, limit: int) -> Decision:
        with self._lock:
            now = time.monotonic()
            if len(self._arrivals) > 100_000:  # forget callers whose quota is full again
                self._arrivals = {k: v for k, v in self._arrivals.items() if v > now}
            decision, self._arrivals[client] = gcra(self._arrivals.get(client, 0.0), now, limit)
            return decision


class RateLimiter:
    """Decides per caller, in Redis when configured (exact across processes), else locally."""

    def __init__(self, redis_url: str | None) -> None:
        self.connection = LazyAsyncRedis(redis_url, REDIS_TIMEOUT_S) if redis_url else None
        self.local = LocalLimiter()
        self._warned = False

    async def decide(self, client: str, limit: int) -> Decision:
        if self.connection is not None:
            try:
                script = self.connection.client().register_script(_GCRA)  # the script's SHA, computed locally
                async with asyncio.timeout(2 * REDIS_TIMEOUT_S):
                    allowed, remaining, retry, reset = await script(keys=[f"{KEY_PREFIX}:rate:{client}"],
                                                                    args=[limit, WINDOW_S])
                self._warned = False
                return Decision(bool(allowed), limit, int(remaining), float(retry), float(reset))
            except (redis.RedisError, OSError, TimeoutError) as exc:
                if not self._warned:
                    logger.warning("rate limits counted per process while Redis is unreachable: %s",
                                   type(exc).__name__)
                    self._warned = True
                await self.connection.reset()
        return self.local.decide(client, limit)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.reset()


class RateLimitMiddleware:
    """Applies the caller's per-minute limit to the synchronous routes before their body is read."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal: Principal | None = scope.get("state", {}).get("principal")
        if (scope["type"] != "http" or principal is None or principal.rate_limit_per_minute <= 0
                or (scope.get("method"), scope["path"].rstrip("/")) not in LIMITED_ROUTES):
            await self.app(scope, receive, send)
            return
        decision = await self.limiter.decide(principal.client, principal.rate_limit_per_minute)
        if not decision.allowed:
            message = (f"more than {decision.limit} requests per minute; retry in "
                       f"{max(1, math.ceil(decision.retry_after_s))} s")
            await error_response(429, "rate_limited", message, decision.headers())(scope, receive, send)
            return
        extra = [(name.lower().encode(), value.encode()) for name, value in decision.headers().items()]

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
