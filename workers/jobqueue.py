"""Unbox's job queue on Redis: atomic scripts, leases with fencing tokens, one outcome per job.

Both sides use this module: the API to enqueue, read and cancel jobs; workers to take jobs,
beat, report progress, record outcomes and reap the jobs of workers that died. Every state
change is one Lua script, so it is atomic, and every time is Redis's own clock (``TIME``),
so no process's clock matters.

A job is a hash ``unbox:job:{id}``. Its status words:

=============  ===================================================================
``queued``     waiting in its queue list (``queue_position`` jobs ahead of it)
``running``    a worker holds its lease; ``progress`` and ``stage`` move
``succeeded``  the method returned; ``result`` holds its JSON
``failed``     it raised, timed out, or its worker was lost twice; ``error`` says which
``canceled``   cancelled while queued, or stopped at a progress report while running
=============  ===================================================================

The guarantees, and how they are kept:

* **At-least-once execution.** Taking a job is one script (pop + mark running + lease); a
  worker that dies or freezes stops beating, and a reaper (every worker runs one; the API
  too, when it reads a stale job) puts the job back at the head of its queue, once; a second
  loss fails it with ``worker_lost``.
* **Exactly one terminal record.** Each take increments the job's fencing ``token``; progress,
  heartbeats and the outcome are written only by the holder of the current token while the
  job is ``running``. A terminal status is therefore written once and never overwritten, and
  a worker that lost its lease (frozen, partitioned, paused) has its late outcome refused.
* **A Redis stall is not a death.** Staleness is counted from the later of a job's last beat
  and the start of the reapers' current unbroken watch: when no reaper pass reached Redis for
  longer than ``gap_s`` (Redis paused, or no reaper alive), the watch restarts and every
  running job gets a full heartbeat TTL to beat again before it can be judged abandoned.

One Redis server (not a cluster): scripts derive job keys from ids.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as RedisRetry

from workers.payload import KEY_PREFIX, cancel_key, image_key

logger = logging.getLogger("unbox.jobs")

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
RUNNING = f"{KEY_PREFIX}:running"
WORKERS = f"{KEY_PREFIX}:workers"
WORKER_BEATS = f"{KEY_PREFIX}:workers:beats"
REAPER_PASS = f"{KEY_PREFIX}:reaper:pass"
REAPER_WATCH = f"{KEY_PREFIX}:reaper:watch"
ANONYMOUS = "anonymous"  # the owner of every job while API keys are off
ENDED = f"{KEY_PREFIX}:jobs:ended"  # jobs whose end is yet to be announced (webhooks); drained by workers
WORKER_FORGET_S = 600  # a worker silent this long is dropped from the list
WORKER_LOST_MESSAGE = ("the worker running this job stopped unexpectedly (killed, frozen or out of memory), "
                       "and so did the worker that retried it; the job was given up")


def job_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}"


def queue_key(name: str) -> str:
    return f"{KEY_PREFIX}:queue:{name}"


def wake_key(name: str) -> str:
    return f"{KEY_PREFIX}:wake:{name}"


def owner_jobs_key(owner: str) -> str:
    """The owner's jobs, scored by their submission sequence (newest highest)."""
    return f"{KEY_PREFIX}:owner:{owner}:jobs"


def active_key(submitter: str) -> str:
    """A submitter's queued and running jobs (its quota: a key, or a client address with keys
    off); kept in step by the scripts that queue and end jobs."""
    return f"{KEY_PREFIX}:active:{submitter}"


def owner_of(fields: dict[str, str]) -> str:
    """Who submitted a job: an API key's id, or ``anonymous`` (jobs from before keys count as that)."""
    return fields.get("owner") or ANONYMOUS


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A Redis client that fails fast (``timeout_s``) when the server is away and reconnects by itself."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, health_check_interval=15,
        retry=RedisRetry(ExponentialBackoff(cap=0.2, base=0.02), 1))


def is_out_of_memory(exc: redis.RedisError) -> bool:
    """Redis refused a write because it reached ``maxmemory`` (policy ``noeviction``)."""
    return isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc)  # also inside scripts


# ----- scripts --------------------------------------------------------------------------------
_CLOCK = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function jobkey(id) return 'unbox:job:' .. id end
local DURATION_BUCKETS = {1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600}
-- Bookkeeping of a job that just ended (in the script that ended it): off its submitter's
-- active set (the quota), onto the list of ends to announce, and into the outcome and duration statistics.
local function record_end(key, id, status, now)
  local f = redis.call('HMGET', key, 'quota', 'payload', 'started_at', 'study')
  if f[1] then redis.call('SREM', f[1], id) end
  if f[4] then  -- a study item: its study counts it (and ends with its last item); items send no webhooks
    local study = 'unbox:study:' .. f[4]
    if redis.call('EXISTS', study) == 1 then
      redis.call('HINCRBY', study, 'n_' .. status, 1)
      local ended = redis.call('HINCRBY', study, 'ended', 1)
      local g = redis.call('HMGET', study, 'total', 'status', 'result_ttl')
      if ended >= tonumber(g[1] or '0') and (g[2] == 'running' or g[2] == 'canceling') then
        redis.call('HSET', study, 'status', g[2] == 'running' and 'succeeded' or 'canceled', 'ended_at', tostring(now))
      end
    end
  else
    redis.call('SADD', 'unbox:jobs:ended', id)
  end
  local ok, payload = pcall(cjson.decode, f[2] or '{}')
  local method = 'unknown'
  if ok and type(payload) == 'table' and type(payload.method) == 'string' then method = payload.method end
  redis.call('HINCRBY', 'unbox:stats:jobs', method .. '\t' .. status, 1)
  if f[3] and f[3] ~= '' then
    local seconds = math.max(now - tonumber(f[3]), 0)
    local le = '+Inf'
    for _, bound in ipairs(DURATION_BUCKETS) do
      if seconds <= bound then le = tostring(bound) break end
    end
    redis.call('HINCRBY', 'unbox:stats:job_seconds', method .. '\t' .. le, 1)
    redis.call('HINCRBYFLOAT', 'unbox:stats:job_seconds', method .. '\tsum', seconds)
    redis.call('HINCRBY', 'unbox:stats:job_seconds', method .. '\tcount', 1)
  end
end
"""

# KEYS: job, queue, image, wake, owner's jobs (sorted by sequence), submitter's active set.
# ARGV: id, queue name, payload, timeout, max losses, pending ttl, image bytes, max queue length,
# result ttl, owner, submitter's most active jobs (0: no limit), index ttl.
_ENQUEUE = _CLOCK + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[8]) then return 'full' end
local quota = tonumber(ARGV[11])
if quota > 0 and redis.call('SCARD', KEYS[6]) >= quota then
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[6])) do  -- drop jobs that ended or expired
    local status = redis.call('HGET', jobkey(id), 'status')
    if status ~= 'queued' and status ~= 'running' then redis.call('SREM', KEYS[6], id) end
  end
  if redis.call('SCARD', KEYS[6]) >= quota then return 'quota' end
end
local created = tostring(clock())
local sequence = redis.call('INCR', 'unbox:jobs:sequence')
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'queue', ARGV[2], 'payload', ARGV[3], 'status', 'queued',
  'attempts', 0, 'lost', 0, 'token', 0, 'progress', 0, 'stage', 'queued', 'created_at', created,
  'timeout_s', ARGV[4], 'max_lost', ARGV[5], 'result_ttl', ARGV[9], 'owner', ARGV[10], 'sequence', sequence,
  'quota', KEYS[6])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[6])
redis.call('ZADD', KEYS[5], sequence, ARGV[1])
redis.call('EXPIRE', KEYS[5], ARGV[12])
redis.call('SADD', KEYS[6], ARGV[1])
redis.call('EXPIRE', KEYS[6], ARGV[12])
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, 63)
return {'queued', created}
"""

# KEYS: running, queue... (in priority order). ARGV: worker name, pending ttl.
_TAKE = _CLOCK + """
for i = 2, #KEYS do
  while true do
    local id = redis.call('RPOP', KEYS[i])
    if not id then break end
    local key = jobkey(id)
    if redis.call('HGET', key, 'status') == 'queued' then
      local now = tostring(clock())
      local attempts = redis.call('HINCRBY', key, 'attempts', 1)
      local token = redis.call('HINCRBY', key, 'token', 1)
      redis.call('HSET', key, 'status', 'running', 'worker', ARGV[1], 'started_at', now, 'beat', now,
        'progress', 0, 'stage', 'starting')
      redis.call('EXPIRE', key, ARGV[2])
      redis.call('ZADD', KEYS[1], now, id)
      return {id, token, attempts, redis.call('HGET', key, 'payload'), redis.call('HGET', key, 'timeout_s')}
    end
  end
end
return false
"""

# KEYS: running. ARGV: id, token. 1 = lease held and renewed, 0 = lease lost.
_HEARTBEAT = _CLOCK + """
local key = jobkey(ARGV[1])
local f = redis.call('HMGET', key, 'status', 'token')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then return 0 end
local now = clock()
redis.call('HSET', key, 'beat', tostring(now))
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
"""

# ARGV: id, token, progress, stage, write (1/0). -1 = lease lost, else 1 when cancel was asked.
_PROGRESS = _CLOCK + """
local key = jobkey(ARGV[1])
local f = redis.call('HMGET', key, 'status', 'token')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then return -1 end
if ARGV[5] == '1' then redis.call('HSET', key, 'progress', ARGV[3], 'stage', ARGV[4]) end
return redis.call('EXISTS', 'unbox:cancel:' .. ARGV[1])
"""

# KEYS: running. ARGV: id, token, status, progress, stage, result JSON or '', error JSON or '',
# then (file name, bytes) pairs of the result's pictures stored beside it.
_FINISH = _CLOCK + """
local key = jobkey(ARGV[1])
local f = redis.call('HMGET', key, 'status', 'token', 'result_ttl')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then return 0 end
local ttl = tonumber(f[3]) or 3600  -- a record Unbox did not write (refused by its worker) has none
local now = clock()
redis.call('HSET', key, 'status', ARGV[3], 'ended_at', tostring(now), 'progress', ARGV[4], 'stage', ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', key, 'result', ARGV[6]) end
if ARGV[7] ~= '' then redis.call('HSET', key, 'error', ARGV[7]) end
for i = 8, #ARGV, 2 do
  redis.call('SET', 'unbox:file:' .. ARGV[1] .. ':' .. ARGV[i], ARGV[i + 1], 'EX', ttl)
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', 'unbox:image:' .. ARGV[1], 'unbox:cancel:' .. ARGV[1])
redis.call('EXPIRE', key, ttl)
record_end(key, ARGV[1], ARGV[3], now)
return 1
"""

# KEYS: running. ARGV: id, token. Gives a lease back (cold shutdown): the job goes first again.
_RELEASE = _CLOCK + """
local key = jobkey(ARGV[1])
local f = redis.call('HMGET', key, 'status', 'token', 'queue')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then return 0 end
redis.call('HINCRBY', key, 'token', 1)
redis.call('HSET', key, 'status', 'queued', 'worker', '', 'stage', 'queued', 'progress', 0)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('RPUSH', 'unbox:queue:' .. f[3], ARGV[1])
redis.call('LPUSH', 'unbox:wake:' .. f[3], '1')
return 1
"""

# KEYS: running, reaper pass, reaper watch. ARGV: gap s, heartbeat ttl s, worker-lost error JSON.
_REAP = _CLOCK + """
local now = clock()
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SET', KEYS[2], tostring(now))
local watch = tonumber(redis.call('GET', KEYS[3]) or '0')
if now - last > tonumber(ARGV[1]) then
  watch = now
  redis.call('SET', KEYS[3], tostring(now))
end
local ttl = tonumber(ARGV[2])
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)) do
  local key = jobkey(id)
  local f = redis.call('HMGET', key, 'status', 'beat', 'max_lost', 'queue', 'result_ttl')
  if f[1] ~= 'running' then
    redis.call('ZREM', KEYS[1], id)
  elseif math.max(tonumber(f[2]) or 0, watch) + ttl < now then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HINCRBY', key, 'token', 1)
    local lost = redis.call('HINCRBY', key, 'lost', 1)
    if lost < tonumber(f[3]) then
      redis.call('HSET', key, 'status', 'queued', 'worker', '', 'stage', 'retrying', 'progress', 0)
      redis.call('RPUSH', 'unbox:queue:' .. f[4], id)
      redis.call('LPUSH', 'unbox:wake:' .. f[4], '1')
      table.insert(out, {id, 'retried'})
    else
      redis.call('HSET', key, 'status', 'failed', 'ended_at', tostring(now), 'stage', 'failed', 'error', ARGV[3])
      redis.call('DEL', 'unbox:image:' .. id, 'unbox:cancel:' .. id)
      redis.call('EXPIRE', key, f[5])
      record_end(key, id, 'failed', now)
      table.insert(out, {id, 'failed'})
    end
  end
end
return out
"""

# KEYS: job, image, cancel. ARGV: id, cancel ttl, canceled error JSON, the caller (owner).
_CANCEL = _CLOCK + """
local f = redis.call('HMGET', KEYS[1], 'status', 'queue', 'result_ttl', 'owner')
if not f[1] or (f[4] or 'anonymous') ~= ARGV[4] then return 'missing' end
if f[1] == 'queued' then
  local now = clock()
  redis.call('LREM', 'unbox:queue:' .. f[2], 0, ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'ended_at', tostring(now), 'stage', 'canceled',
    'error', ARGV[3])
  redis.call('DEL', KEYS[2])
  redis.call('EXPIRE', KEYS[1], f[3])
  record_end(KEYS[1], ARGV[1], 'canceled', now)
  return 'canceled'
end
if f[1] == 'running' then
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
  return 'requested'
end
return f[1]
"""

# KEYS: workers, beats. ARGV: name, info JSON.
_WORKER_BEAT = _CLOCK + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], clock(), ARGV[1])
return 1
"""


# ----- data -----------------------------------------------------------------------------------
@dataclass
class Lease:
    """A worker's hold on one running job: the fencing ``token`` it writes with."""

    job_id: str
    token: int
    attempt: int
    payload: Any  # the stored JSON, decoded (``None`` when absent or not JSON); the worker validates it
    timeout_s: int
    lost: bool = field(default=False)


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as the worker records it."""

    status: str  # succeeded | failed | canceled
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    progress: float = 1.0
    stage: str = "done"
    files: dict[str, bytes] = field(default_factory=dict)  # pictures stored beside the result


def iso(seconds: str | float | None) -> str | None:
    """Redis-clock seconds as an ISO 8601 UTC time (``None`` when unset)."""
    if seconds in (None, ""):
        return None
    moment = datetime.fromtimestamp(float(seconds), timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(payload: Any) -> Any:
    """A job's stored payload as JSON data, ``None`` when it is missing or is not JSON (never unpickled)."""
    if payload is None:
        return None
    try:
        return json.loads(_text(payload))
    except ValueError:  # also a UnicodeDecodeError
        return None


def _seconds(value: Any, default: int = 60) -> int:
    """A stored timeout, ``default`` when missing or not a positive integer."""
    try:
        return max(int(_text(value)), 1) if value is not None else default
    except ValueError:
        return default


def job_view(fields: dict[str, str], position: int | None = None, *, with_result: bool = True) -> dict[str, Any]:
    """The public JSON of a job (``GET /v1/jobs/{id}``) from its stored fields."""
    payload = _decoded(fields.get("payload"))
    payload = payload if isinstance(payload, dict) else {}  # a record Unbox did not write shows no request
    status = fields.get("status", "queued")
    view: dict[str, Any] = {
        "id": fields.get("id"),
        "status": status,
        "method": payload.get("method"),
        "model": payload.get("model"),
        "target": payload.get("target"),
        "progress": float(fields.get("progress") or 0.0),
        "stage": fields.get("stage") or status,
        "attempts": int(fields.get("attempts") or 0),
        "created_at": iso(fields.get("created_at")),
        "started_at": iso(fields.get("started_at")) if status != "queued" else None,
        "ended_at": iso(fields.get("ended_at")) if status in TERMINAL else None,
    }
    if isinstance(payload.get("params_used"), dict):
        view["params"] = payload["params_used"]
    if isinstance(payload.get("intake"), dict):
        view["intake"] = payload["intake"]
    if status == "queued" and position is not None:
        view["queue_position"] = position
    if status == "succeeded" and with_result:
        view["result"] = json.loads(fields.get("result") or "null")
        if isinstance(view["result"], dict):  # the OpenAPI result union is told apart by method
            view["result"].setdefault("method", view["method"])
    if fields.get("error") and status in ("failed", "canceled"):
        view["error"] = json.loads(fields["error"])
    return view


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# ----- the store ------------------------------------------------------------------------------
class JobStore:
    """Every job operation of the API and the workers, on one Redis connection."""

    def __init__(self, connection: redis.Redis, queue_name: str, heartbeat_s: float, max_losses: int = 2) -> None:
        self.redis = connection
        self.queue_name = queue_name
        self.heartbeat_s = heartbeat_s
        self.max_losses = max_losses
        self.ttl_s = heartbeat_ttl(heartbeat_s)
        self.gap_s = reaper_gap(heartbeat_s)
        scripts = {"enqueue": _ENQUEUE, "take": _TAKE, "heartbeat": _HEARTBEAT, "progress": _PROGRESS,
                   "finish": _FINISH, "release": _RELEASE, "reap": _REAP, "cancel": _CANCEL,
                   "worker_beat": _WORKER_BEAT}
        self._scripts = {name: connection.register_script(text) for name, text in scripts.items()}

    # --- the API's side ---
    def enqueue(self, job_id: str, payload: dict[str, Any], image: bytes, *, timeout_s: int, pending_ttl_s: int,
                result_ttl_s: int, max_queue: int, owner: str = ANONYMOUS, submitter: str | None = None,
                max_active: int = 0) -> dict[str, Any] | str:
        """Queue a job of ``owner`` with its stored image: the job's view as queued, else ``full``
        (the queue), ``quota`` (``submitter``, by default the owner, has ``max_active`` jobs
        queued or running) or ``exists``."""
        index_ttl = int(pending_ttl_s) + int(result_ttl_s) + int(timeout_s)
        answer = self._scripts["enqueue"](
            keys=[job_key(job_id), queue_key(self.queue_name), image_key(job_id), wake_key(self.queue_name),
                  owner_jobs_key(owner), active_key(submitter or owner)],
            args=[job_id, self.queue_name, _json(payload), int(timeout_s), self.max_losses, int(pending_ttl_s),
                  image, int(max_queue), int(result_ttl_s), owner, int(max_active), index_ttl])
        if not isinstance(answer, list):
            return _text(answer)
        return job_view({"id": job_id, "status": "queued", "payload": _json(payload), "created_at": _text(answer[1])},
                        with_result=False)

    def fields(self, job_id: str) -> dict[str, str] | None:
        """The stored fields of a job, ``None`` when it never existed or expired."""
        raw = self.redis.hgetall(job_key(job_id))
        return {_text(k): _text(v) for k, v in raw.items()} or None

    def position(self, fields: dict[str, str]) -> int | None:
        """How many jobs a queued job waits behind (0 = next), ``None`` once it left the queue."""
        key = queue_key(fields.get("queue") or self.queue_name)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpos(key, fields["id"])
            pipe.llen(key)
            index, length = pipe.execute()
        return None if index is None else int(length) - 1 - int(index)

    def view(self, job_id: str, *, with_result: bool = True) -> dict[str, Any] | None:
        fields = self.fields(job_id)
        return None if fields is None else self.view_of(fields, with_result=with_result)

    def view_of(self, fields: dict[str, str], *, with_result: bool = True) -> dict[str, Any]:
        """The view of a job read with :meth:`fields` (its queue position looked up while queued)."""
        position = self.position(fields) if fields.get("status") == "queued" else None
        return job_view(fields, position, with_result=with_result)

    def is_stale(self, fields: dict[str, str]) -> bool:
        """A running job whose last beat is older than the heartbeat TTL on Redis's clock."""
        if fields.get("status") != "running":
            return False
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6 - float(fields.get("beat") or 0) > self.ttl_s

    def cancel(self, job_id: str, cancel_ttl_s: int, owner: str = ANONYMOUS) -> str:
        """``canceled`` (it was queued), ``requested`` (running: it stops at its next report),
        ``missing`` (also when it is not ``owner``'s), or the terminal status it already has."""
        error = _json({"code": "canceled", "message": "the job was canceled before it started"})
        answer = self._scripts["cancel"](keys=[job_key(job_id), image_key(job_id), cancel_key(job_id)],
                                         args=[job_id, int(cancel_ttl_s), error, owner])
        return _text(answer)

    def owned(self, owner: str, limit: int, before: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
        """``owner``'s jobs, newest first, without results: up to ``limit`` of those submitted
        before sequence number ``before``, and the cursor of the next page (``None`` at the end).
        Jobs that expired are dropped from the owner's index on the way."""
        key = owner_jobs_key(owner)
        upper = f"({before}" if before is not None else "+inf"
        views: list[dict[str, Any]] = []
        last = 0
        while True:
            wanted = limit + 1 - len(views)  # one beyond the page tells whether another follows
            rows = self.redis.zrevrangebyscore(key, upper, "-inf", start=0, num=wanted, withscores=True)
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, _ in rows:
                    pipe.hgetall(job_key(_text(job_id)))
                records = pipe.execute() if rows else []
            expired = []
            for (job_id, score), raw in zip(rows, records):
                upper = f"({int(score)}"
                fields = {_text(k): _text(v) for k, v in raw.items()}
                if not fields:
                    expired.append(job_id)
                elif len(views) == limit:
                    break
                else:
                    views.append(job_view(fields, with_result=False))
                    last = int(score)
            else:
                if expired:
                    self.redis.zrem(key, *expired)
                if len(rows) < wanted:
                    return views, None
                continue
            if expired:
                self.redis.zrem(key, *expired)
            return views, last

    def queue_length(self) -> int:
        return int(self.redis.llen(queue_key(self.queue_name)))

    # --- the workers' side ---
    def take(self, worker: str, queues: list[str] | None = None, pending_ttl_s: int = 24 * 3600) -> Lease | None:
        """Pop the next queued job (queues in priority order) and lease it to ``worker``."""
        names = queues or [self.queue_name]
        answer = self._scripts["take"](keys=[RUNNING, *[queue_key(name) for name in names]],
                                       args=[worker, int(pending_ttl_s)])
        if not answer:
            return None
        job_id, token, attempt, payload, timeout = answer
        # A record Unbox did not write (no payload, not JSON) still gives a lease: the worker refuses it.
        return Lease(_text(job_id), int(token), int(attempt), _decoded(payload), _seconds(timeout))

    def wait_for_work(self, timeout_s: float, queues: list[str] | None = None) -> None:
        """Block until a submission wakes this worker or ``timeout_s`` passes."""
        names = queues or [self.queue_name]
        self.redis.blpop([wake_key(name) for name in names], timeout=max(timeout_s, 0.01))

    def heartbeat(self, lease: Lease) -> bool:
        """Renew the lease; ``False`` when it is no longer this worker's."""
        return bool(self._scripts["heartbeat"](keys=[RUNNING], args=[lease.job_id, lease.token]))

    def progress(self, lease: Lease, fraction: float, stage: str, write: bool) -> int:
        """Record progress (when ``write``); 1 when a cancel was asked, 0 if not, -1 when the lease is lost."""
        return int(self._scripts["progress"](args=[lease.job_id, lease.token, round(fraction, 4), stage,
                                                   "1" if write else "0"]))

    def finish(self, lease: Lease, outcome: Outcome) -> bool:
        """Write the attempt's terminal record; ``False`` when the lease was lost (nothing written)."""
        args = [lease.job_id, lease.token, outcome.status, outcome.progress, outcome.stage,
                _json(outcome.result) if outcome.result is not None else "",
                _json(outcome.error) if outcome.error is not None else ""]
        for name, data in outcome.files.items():
            args += [name, data]
        return bool(self._scripts["finish"](keys=[RUNNING], args=args))

    def release(self, lease: Lease) -> bool:
        """Give the lease back (the job goes to the head of its queue); ``False`` when already lost."""
        return bool(self._scripts["release"](keys=[RUNNING], args=[lease.job_id, lease.token]))

    def reap(self) -> list[tuple[str, str]]:
        """Retry once, or fail with ``worker_lost``, the running jobs whose worker stopped beating.
        Returns ``(job id, "retried" | "failed")`` pairs."""
        error = _json({"code": "worker_lost", "message": WORKER_LOST_MESSAGE})
        answer = self._scripts["reap"](keys=[RUNNING, REAPER_PASS, REAPER_WATCH],
                                       args=[self.gap_s, self.ttl_s, error])
        return [(_text(job_id), _text(what)) for job_id, what in answer or []]

    def ended(self, limit: int = 100) -> list[str]:
        """Jobs that ended and whose end is not announced yet (each end is added in the same
        script that writes it, so none is missed; :meth:`announced` takes them off)."""
        return [_text(job_id) for job_id in self.redis.srandmember(ENDED, limit) or []]

    def announced(self, job_ids: list[str]) -> None:
        if job_ids:
            self.redis.srem(ENDED, *job_ids)

    def beat_worker(self, name: str, info: dict[str, Any]) -> None:
        self._scripts["worker_beat"](keys=[WORKERS, WORKER_BEATS], args=[name, _json(info)])

    def forget_worker(self, name: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hdel(WORKERS, name)
            pipe.zrem(WORKER_BEATS, name)
            pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        """Every worker seen lately, with ``alive`` judged on Redis's clock; long-silent ones are dropped."""
        seconds, micros = self.redis.time()
        return workers_from(seconds + micros / 1e6, self.redis.zrange(WORKER_BEATS, 0, -1, withscores=True),
                            self.redis.hgetall(WORKERS), self.ttl_s, self.redis)


def workers_from(now: float, beats: list[tuple[Any, float]], infos: dict[Any, Any], ttl_s: float,
                 prune: Any = None) -> list[dict[str, Any]]:
    """The worker list from its raw Redis parts (shared by the sync store and the async health check)."""
    listed = []
    for raw_name, beat in beats:
        name = _text(raw_name)
        silent = now - float(beat)
        if silent > WORKER_FORGET_S:
            if prune is not None:
                prune.zrem(WORKER_BEATS, name)
                prune.hdel(WORKERS, name)
            continue
        info = json.loads(_text(infos.get(raw_name, b"{}")) or "{}")
        info.update(name=name, alive=silent <= ttl_s, last_beat_s_ago=round(max(silent, 0.0), 3))
        listed.append(info)
    return listed


def heartbeat_ttl(heartbeat_s: float) -> int:
    """Seconds after its last heartbeat that a running job's worker is presumed dead."""
    return int(3 * heartbeat_s + 2.999)


def reaper_gap(heartbeat_s: float) -> float:
    """A pause between reaper passes longer than this (Redis stalled, or no reaper alive) restarts
    the watch, so that staleness is never counted across it."""
    return 2 * heartbeat_s + 1.0
