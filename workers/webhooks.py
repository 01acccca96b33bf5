"""Signed job-end webhooks (Standard Webhooks), delivered off the job path with retries.

When a job ends, a delivery record is stored in Redis and put in a sorted set by due time.
Every worker runs a :class:`WebhookSender` thread that claims due deliveries (a claim is a
lease: a sender that dies mid-delivery leaves it to be retried), POSTs them and reschedules
failures with exponential backoff. So a slow or dead receiver never delays the next job, and a
delivery survives the worker that scheduled it.

Signature (https://www.standardwebhooks.com): headers ``webhook-id`` (the same for every
attempt of one event), ``webhook-timestamp`` (Unix seconds of the attempt) and
``webhook-signature`` = ``"v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))``, where
the key is the base64-decoded part after ``whsec_`` of the secret, or the secret's UTF-8 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

import redis

from workers.jobqueue import TERMINAL, JobStore, job_view

logger = logging.getLogger("unbox.webhooks")

PENDING = "unbox:webhooks:pending"
RECORD_TTL_S = 3 * 24 * 3600
MAX_BACKOFF_S = 600.0

# Claim the first due delivery by pushing its due time past a lease; returns its id or nil.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #ids == 0 then return false end
redis.call('ZADD', KEYS[1], ARGV[2], ids[1])
return ids[1]
"""


def _record_key(delivery_id: str) -> str:
    return f"unbox:webhook:{delivery_id}"


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_<base64>``) or of a plain text secret."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_"):])
    return secret.encode("utf-8")


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify(key: bytes, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    """Check a received webhook (what a receiver does; used by the tests and the docs' example)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        message_id, timestamp = lowered["webhook-id"], int(lowered["webhook-timestamp"])
        signatures = lowered["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(key, message_id, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in signatures)


def check_callback_url(url: str) -> str | None:
    """Why ``url`` cannot take webhooks, or ``None`` when it can."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "callback_url must be an absolute http:// or https:// URL"
    if len(url) > 2048:
        return "callback_url is longer than 2048 characters"
    return None


def event_for(view: dict[str, Any]) -> dict[str, Any]:
    """The webhook body for a job that ended: its view without the (large) result."""
    data = {key: value for key, value in view.items() if key != "result"}
    data["links"] = {"self": f"/v1/jobs/{view['id']}", "result_png": f"/v1/jobs/{view['id']}/result.png"}
    return {"type": f"job.{view['status']}",
            "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "data": data}


def end_event_once(job_id: str, status: str) -> str:
    """The de-duplication key of a job's end event: the API (cancelling a queued job) and a
    worker that had already taken it may both see the job end, and must send one webhook."""
    return f"{job_id}:{status}"


def schedule(connection: redis.Redis, url: str, event: dict[str, Any], once: str | None = None) -> str | None:
    """Store one delivery of ``event`` to ``url``, due now; returns the webhook id, or ``None``
    when an event with the same ``once`` key was already scheduled."""
    if once is not None and not connection.set(f"unbox:webhook:once:{once}", b"1", nx=True, ex=RECORD_TTL_S):
        return None
    message_id = "msg_" + uuid.uuid4().hex
    record = {"url": url, "body": json.dumps(event, separators=(",", ":")), "attempts": 0}
    with connection.pipeline() as pipe:
        pipe.set(_record_key(message_id), json.dumps(record), ex=RECORD_TTL_S)
        pipe.zadd(PENDING, {message_id: time.time()})
        pipe.execute()
    return message_id


def schedule_job_end(store: JobStore, job_id: str) -> bool:
    """Schedule the end event of ``job_id`` when it asked for a callback and has ended; ``True``
    when a delivery was scheduled (each job end is scheduled once, whoever sees it first)."""
    fields = store.fields(job_id)
    if fields is None or fields.get("status") not in TERMINAL:
        return False
    url = json.loads(fields.get("payload") or "{}").get("callback_url")
    if not url:
        return False
    view = job_view(fields, with_result=False)
    return schedule(store.redis, url, event_for(view), once=end_event_once(job_id, view["status"])) is not None


class WebhookSender(threading.Thread):
    """Background delivery of due webhooks (one per worker process)."""

    def __init__(self, connection: redis.Redis, secret: str | None, max_attempts: int, backoff_s: float,
                 timeout_s: float, poll_s: float = 0.25) -> None:
        super().__init__(name="unbox-webhooks", daemon=True)
        self.connection = connection
        self.key = signing_key(secret) if secret else None
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.flush_s = min(timeout_s, 10.0)
        self.wake = threading.Event()
        self._halt = threading.Event()
        self._claim = connection.register_script(_CLAIM)

    def stop(self, timeout: float = 15.0) -> None:
        self._halt.set()
        self.wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        while not self._halt.is_set():
            delivered = self._deliver_safely(None)
            if not delivered:
                self.wake.wait(self.poll_s)
                self.wake.clear()
        # Stopping (warm shutdown): one last pass, so the webhook of the job just finished
        # leaves with this worker instead of waiting for another one.
        self._deliver_safely(time.monotonic() + self.flush_s)

    def _deliver_safely(self, deadline: float | None) -> int:
        try:
            return self.deliver_due(deadline)
        except redis.RedisError as exc:
            logger.warning("webhook sender cannot reach Redis: %s", exc)
        except Exception:  # never let the thread die
            logger.exception("webhook sender failed")
        return 0

    def deliver_due(self, deadline: float | None = None) -> int:
        """Deliver every delivery due now (until ``deadline``, or until stopped when ``None``)."""
        count = 0
        while (not self._halt.is_set()) if deadline is None else time.monotonic() < deadline:
            now = time.time()
            claimed = self._claim(keys=[PENDING], args=[now, now + self.timeout_s + 30])
            if not claimed:
                return count
            count += 1
            self._attempt(claimed.decode() if isinstance(claimed, bytes) else str(claimed))
        return count

    def _attempt(self, message_id: str) -> None:
        raw = self.connection.get(_record_key(message_id))
        if raw is None:
            self.connection.zrem(PENDING, message_id)
            return
        record = json.loads(raw)
        body = record["body"].encode("utf-8")
        record["attempts"] += 1
        error = self._post(record["url"], message_id, body)
        if error is None:
            with self.connection.pipeline() as pipe:
                pipe.zrem(PENDING, message_id)
                pipe.delete(_record_key(message_id))
                pipe.execute()
            logger.info("webhook %s delivered to %s (attempt %d)", message_id, record["url"], record["attempts"])
            return
        if record["attempts"] >= self.max_attempts:
            logger.error("webhook %s to %s given up after %d attempts: %s", message_id, record["url"],
                         record["attempts"], error)
            with self.connection.pipeline() as pipe:
                pipe.zrem(PENDING, message_id)
                pipe.delete(_record_key(message_id))
                pipe.execute()
            return
        delay = min(self.backoff_s * 2 ** (record["attempts"] - 1), MAX_BACKOFF_S)
        logger.warning("webhook %s to %s failed (attempt %d: %s); retrying in %.1f s", message_id,
                       record["url"], record["attempts"], error, delay)
        with self.connection.pipeline() as pipe:
            pipe.set(_record_key(message_id), json.dumps(record), ex=RECORD_TTL_S)
            pipe.zadd(PENDING, {message_id: time.time() + delay})
            pipe.execute()

    def _post(self, url: str, message_id: str, body: bytes) -> str | None:
        """POST once; ``None`` on a 2xx answer, else why it failed."""
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": "unbox-webhooks/1",
                   "webhook-id": message_id, "webhook-timestamp": str(timestamp)}
        if self.key is not None:
            headers["webhook-signature"] = sign(self.key, message_id, timestamp, body)
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return str(getattr(exc, "reason", exc))
        return None if 200 <= status < 300 else f"HTTP {status}"
