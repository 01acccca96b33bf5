"""Signed job-end webhooks (Standard Webhooks), delivered off the job path with retries.

When a job ends, a delivery record is stored in Redis and put in a sorted set by due time.
Every worker runs a :class:`WebhookSender` thread that claims due deliveries (a claim is a
lease: a sender that dies mid-delivery leaves it to be retried), POSTs them and reschedules
failures with exponential backoff. So a slow or dead receiver never delays the next job, and a
delivery survives the worker that scheduled it.

Signature (https://www.standardwebhooks.com): headers ``webhook-id`` (the same for every
attempt of one event), ``webhook-timestamp`` (Unix seconds of the attempt) and
``webhook-signature`` = ``"v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))``, where
the key is the base64-decoded part after ``whsec_`` of the secret (24 to 64 bytes; padding
optional), so the ``standardwebhooks`` library verifies every POST.

Safe callbacks: every delivery checks its URL again (:mod:`workers.callback_guard`; DNS may have
changed since the API accepted it), then connects to the very addresses it checked, with the
Host header, TLS SNI and certificate check on the URL's host name. A refused destination is
given up at once; redirects are never followed (a 3xx is a failed attempt).

Counters for Prometheus, in the Redis hash :data:`STATS`: one field per attempt outcome:
``delivered``, ``failed_attempt`` (retried later), ``given_up`` (the last attempt failed) and
``refused`` (the guard refused the destination at delivery time: no connection was made).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.client
import json
import logging
import socket
import ssl
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import redis

from workers.callback_guard import CallbackGuard, CallbackRefused, Destination, IPAddress
from workers.jobqueue import TERMINAL, JobStore, job_view

if TYPE_CHECKING:
    from core.settings import CoreSettings

logger = logging.getLogger("unbox.webhooks")

PENDING = "unbox:webhooks:pending"
STATS = "unbox:stats:webhooks"  # delivery counters (HINCRBY), read by the /metrics collector
RECORD_TTL_S = 3 * 24 * 3600
MAX_BACKOFF_S = 600.0
SECRET_PREFIX = "whsec_"
SECRET_KEY_BYTES = (24, 64)
GENERATE_SECRET = 'python -c "import base64,os;print(\'whsec_\'+base64.b64encode(os.urandom(32)).decode())"'

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
    """The HMAC key of a Standard Webhooks secret, ``whsec_`` + base64 (padded or not) of 24 to 64
    bytes; ``ValueError`` saying what is wrong (never quoting the secret) for anything else."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"must be a Standard Webhooks secret: {SECRET_PREFIX!r} followed by base64 "
                         "(plain text secrets are not accepted)")
    encoded = secret[len(SECRET_PREFIX):]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SECRET_PREFIX!r} is not base64") from None
    low, high = SECRET_KEY_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"the key decodes to {len(key)} bytes; {low} to {high} are needed")
    return key


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
    try:
        payload = json.loads(fields.get("payload") or "{}")
    except ValueError:  # a record Unbox did not write: it has no callback
        return False
    url = payload.get("callback_url") if isinstance(payload, dict) else None
    if not url:
        return False
    view = job_view(fields, with_result=False)
    return schedule(store.redis, url, event_for(view), once=end_event_once(job_id, view["status"])) is not None


def _open_socket(addresses: tuple[IPAddress, ...], port: int, timeout: float) -> socket.socket:
    """A TCP connection to the first of the vetted ``addresses`` that answers (no name lookup)."""
    error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((str(address), port), timeout=timeout)
        except OSError as exc:
            error = exc
    raise error or OSError("no address to connect to")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a vetted destination: connects to its checked addresses, never resolving the name
    again (so DNS cannot rebind between the check and the connection); Host keeps the name."""

    def __init__(self, destination: Destination, timeout: float) -> None:
        super().__init__(destination.host, destination.port, timeout=timeout)
        self.addresses = destination.addresses

    def connect(self) -> None:
        self.sock = _open_socket(self.addresses, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a vetted destination's addresses; SNI and the certificate check use the URL's host."""

    def __init__(self, destination: Destination, timeout: float, tls: ssl.SSLContext) -> None:
        super().__init__(destination.host, destination.port, timeout=timeout, context=tls)
        self.addresses = destination.addresses
        self.tls = tls

    def connect(self) -> None:
        sock = _open_socket(self.addresses, self.port, self.timeout)
        try:
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def post(destination: Destination, headers: dict[str, str], body: bytes, timeout_s: float,
         tls: ssl.SSLContext | None = None) -> str | None:
    """POST ``body`` once to a vetted destination; ``None`` on a 2xx answer, else why it failed.
    A redirect is an answer like any other non-2xx: it is not followed."""
    if destination.scheme == "https":
        connection: http.client.HTTPConnection = _PinnedHTTPSConnection(
            destination, timeout_s, tls or ssl.create_default_context())
    else:
        connection = _PinnedHTTPConnection(destination, timeout_s)
    try:
        connection.request("POST", destination.target, body=body, headers={**headers, "Connection": "close"})
        response = connection.getresponse()
        status = response.status
        location = response.getheader("Location")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        connection.close()
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"HTTP {status} redirect to {location!r}, not followed"
    return f"HTTP {status}"


class WebhookSender(threading.Thread):
    """Background delivery of due webhooks (one per worker process). Without a secret it sends
    nothing: its deliveries wait for a worker that can sign them."""

    def __init__(self, connection: redis.Redis, secret: str | None, max_attempts: int, backoff_s: float,
                 timeout_s: float, poll_s: float = 0.25, guard: CallbackGuard | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(name="unbox-webhooks", daemon=True)
        self.connection = connection
        self.key = signing_key(secret) if secret else None
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.guard = guard or CallbackGuard()
        self.tls = tls
        self.flush_s = min(timeout_s, 10.0)
        self.wake = threading.Event()
        self._halt = threading.Event()
        self._claim = connection.register_script(_CLAIM)

    @classmethod
    def from_settings(cls, connection: redis.Redis, settings: CoreSettings) -> WebhookSender:
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        return cls(connection, secret, settings.webhook_max_attempts, settings.webhook_backoff_s,
                   settings.webhook_timeout_s, guard=CallbackGuard(settings.webhook_allow_networks))

    def stop(self, timeout: float = 15.0) -> None:
        self._halt.set()
        self.wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        if self.key is None:
            logger.warning("UNBOX_WEBHOOK_SECRET is not set: this worker sends no webhooks (they wait "
                           "for a worker that has the secret)")
            return
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
        if self.key is None:
            return 0
        count = 0
        while (not self._halt.is_set()) if deadline is None else time.monotonic() < deadline:
            now = time.time()
            claimed = self._claim(keys=[PENDING], args=[now, now + self.timeout_s + 30])
            if not claimed:
                return count
            count += 1
            self._attempt(claimed.decode() if isinstance(claimed, bytes) else str(claimed))
        return count

    def _count(self, outcome: str) -> None:
        """Count an attempt's outcome; best effort, apart from the delivery's own bookkeeping (a
        full Redis refuses HINCRBY, and must not make a delivered webhook look undelivered)."""
        try:
            self.connection.hincrby(STATS, outcome, 1)
        except redis.RedisError as exc:
            logger.warning("webhook counter %s not counted: %s", outcome, exc)

    def _close(self, message_id: str, outcome: str) -> None:
        """Drop a delivery that is done (delivered, given up or refused) and count its outcome."""
        with self.connection.pipeline() as pipe:
            pipe.zrem(PENDING, message_id)
            pipe.delete(_record_key(message_id))
            pipe.execute()
        self._count(outcome)

    def _attempt(self, message_id: str) -> None:
        raw = self.connection.get(_record_key(message_id))
        if raw is None:
            self.connection.zrem(PENDING, message_id)
            return
        record = json.loads(raw)
        url = record["url"]
        try:
            destination = self.guard.check(url)
        except CallbackRefused as exc:
            logger.error("webhook %s to %s refused at delivery, given up without retries: %s", message_id, url, exc)
            self._close(message_id, "refused")
            return
        record["attempts"] += 1
        error = self._post(destination, message_id, record["body"].encode("utf-8"))
        if error is None:
            self._close(message_id, "delivered")
            logger.info("webhook %s delivered to %s (attempt %d)", message_id, url, record["attempts"])
            return
        if record["attempts"] >= self.max_attempts:
            logger.error("webhook %s to %s given up after %d attempts: %s", message_id, url, record["attempts"], error)
            self._close(message_id, "given_up")
            return
        delay = min(self.backoff_s * 2 ** (record["attempts"] - 1), MAX_BACKOFF_S)
        logger.warning("webhook %s to %s failed (attempt %d: %s); retrying in %.1f s", message_id, url,
                       record["attempts"], error, delay)
        with self.connection.pipeline() as pipe:
            pipe.set(_record_key(message_id), json.dumps(record), ex=RECORD_TTL_S)
            pipe.zadd(PENDING, {message_id: time.time() + delay})
            pipe.execute()
        self._count("failed_attempt")

    def _post(self, destination: Destination, message_id: str, body: bytes) -> str | None:
        """One signed POST; ``None`` on a 2xx answer, else why it failed."""
        assert self.key is not None
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": "unbox-webhooks/1",
                   "webhook-id": message_id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(self.key, message_id, timestamp, body)}
        return post(destination, headers, body, self.timeout_s, self.tls)
