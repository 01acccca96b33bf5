"""Prometheus metrics of one app instance (its own registry, so several apps can coexist).

This process's own numbers: HTTP requests and latencies by route template (never the raw path,
so job ids do not become series), inference time by model and method, and the process and
platform collectors (CPU, memory, open files; Python version). The queue's numbers are read
from Redis at scrape time by :class:`QueueCollector`, so every API process reports the same
totals whichever worker did the work: queue length, workers alive, jobs by method and outcome,
job durations, webhook deliveries. The job and webhook counts are hashes that the queue's
scripts and the webhook sender keep up to date; this module only reads them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import (CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from redis.backoff import NoBackoff
from redis.retry import Retry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.jobqueue import WORKER_BEATS, heartbeat_ttl, queue_key, workers_from
from workers.payload import KEY_PREFIX
from core.settings import CoreSettings

logger = logging.getLogger("unbox.metrics")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SCRAPE_TIMEOUT_S = 0.5  # per Redis connect / read at scrape time; one round trip per scrape
JOB_STATS = f"{KEY_PREFIX}:stats:jobs"  # "{method}\t{status}" -> jobs
JOB_SECONDS = f"{KEY_PREFIX}:stats:job_seconds"  # "{method}\t{le}" -> jobs in that bucket; "\tsum", "\tcount"
WEBHOOK_STATS = f"{KEY_PREFIX}:stats:webhooks"  # outcome -> deliveries
JOB_DURATION_BOUNDS = ("1", "5", "15", "30", "60", "120", "300", "600", "1800", "3600", "+Inf")
WEBHOOK_OUTCOMES = ("delivered", "failed_attempt", "given_up", "refused")


class QueueCollector:
    """The queue's metrics, read from Redis at each scrape within ``SCRAPE_TIMEOUT_S``; nothing
    (silently) when Redis is not configured or does not answer, so a scrape never fails or waits."""

    def __init__(self, redis_url: str | None, queue_name: str, heartbeat_s: float,
                 timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.queue_name = queue_name
        self.ttl_s = heartbeat_ttl(heartbeat_s)
        # No retries: a scrape that cannot reach Redis at once skips the queue's numbers.
        self.client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry=Retry(NoBackoff(), 0)) if redis_url else None

    def describe(self) -> list[Metric]:
        return []  # registering must not reach Redis

    def collect(self) -> Iterator[Metric]:
        if self.client is None:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.time()
                pipe.llen(queue_key(self.queue_name))
                pipe.zrange(WORKER_BEATS, 0, -1, withscores=True)
                pipe.hgetall(JOB_STATS)
                pipe.hgetall(JOB_SECONDS)
                pipe.hgetall(WEBHOOK_STATS)
                (seconds, micros), queued, beats, jobs, durations, webhooks = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            logger.debug("queue metrics skipped: Redis did not answer (%s)", type(exc).__name__)
            return
        queue = GaugeMetricFamily("unbox_queue_length", "Jobs waiting in the queue", labels=["queue"])
        queue.add_metric([self.queue_name], int(queued))
        yield queue
        listed = workers_from(seconds + micros / 1e6, beats, {}, self.ttl_s)
        yield GaugeMetricFamily("unbox_workers_alive", "Workers beating within the heartbeat TTL",
                                value=sum(1 for worker in listed if worker["alive"]))
        yield _jobs_family(_counts(jobs))
        yield _durations_family(_counts(durations))
        yield _webhooks_family(_counts(webhooks))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _counts(raw: dict[Any, Any]) -> dict[str, float]:
    """A stats hash as text fields and numbers; a field that is not a number is left out."""
    counts = {}
    for key, value in raw.items():
        try:
            counts[key.decode() if isinstance(key, bytes) else str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return counts


def _jobs_family(counts: dict[str, float]) -> Metric:
    family = CounterMetricFamily("unbox_jobs_total", "Jobs that ended, by method and outcome",
                                 labels=["method", "status"])
    for field, count in sorted(counts.items()):
        method, sep, status = field.rpartition("\t")
        if sep:
            family.add_metric([method, status], count)
    return family


def _durations_family(counts: dict[str, float]) -> Metric:
    """The cumulative histogram from per-bucket (non-cumulative) counts."""
    family = HistogramMetricFamily("unbox_job_duration_seconds", "Run time of jobs that ended (start to end)",
                                   labels=["method"])
    methods = sorted({field.rpartition("\t")[0] for field in counts if "\t" in field})
    for method in methods:
        buckets, total = [], 0.0
        for bound in JOB_DURATION_BOUNDS:
            total += counts.get(f"{method}\t{bound}", 0.0)
            buckets.append((bound if bound == "+Inf" else floatToGoString(float(bound)), total))
        if total:
            family.add_metric([method], buckets, sum_value=counts.get(f"{method}\tsum", 0.0))
    return family


def _webhooks_family(counts: dict[str, float]) -> Metric:
    family = CounterMetricFamily("unbox_webhook_deliveries_total", "Webhook delivery attempts by outcome",
                                 labels=["outcome"])
    for outcome in sorted(set(WEBHOOK_OUTCOMES) | set(counts)):
        family.add_metric([outcome], counts.get(outcome, 0.0))
    return family


class Metrics:
    """Request counts and latencies per route and HTTP method; inference time per model/method;
    the process's own collectors; with ``settings`` naming a Redis, the queue's numbers too."""

    content_type = CONTENT_TYPE_PLAIN_0_0_4  # the text format every Prometheus version reads

    def __init__(self, settings: CoreSettings | None = None) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.queue: QueueCollector | None = None
        if settings is not None and settings.redis_url:
            self.queue = QueueCollector(settings.redis_url, settings.queue_name, settings.worker_heartbeat_s)
            self.registry.register(self.queue)
        self.requests = Counter("unbox_http_requests_total", "HTTP requests",
                                ["route", "http_method", "status"], registry=self.registry)
        self.latency = Histogram("unbox_http_request_duration_seconds", "HTTP request latency",
                                 ["route", "http_method"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("unbox_inference_seconds", "Model inference time (explain or predict)",
                                   ["model", "method"], buckets=_LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()


class MetricsMiddleware:
    """Counts each request under its route template (``/v1/jobs/{job_id}``, not the raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "GET")
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)
