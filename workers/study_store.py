"""Studies in Redis: one record per study, its images once, and one queued job per item.

A study ``{sid}`` is a hash ``unbox:study:{sid}`` (owner, spec, rows, counters, status, and the
summary once it is computed), its images (``unbox:study:{sid}:image:{n}``, stored once however
many models and methods read them) and region masks, and one job per (image row, model,
method): ``unbox:job:{sid}-{k}``, on the study queue ``{queue}:studies``, which workers drain
after the interactive queue. Item jobs are ordinary jobs (leases, retries, one terminal record;
:mod:`workers.jobqueue`) with a ``study`` field, so the script that ends a job also counts it in
its study, atomically, and ends the study with its last item: progress never needs a scan.

Items are numbered ``k = (row * models + model) * methods + method``, so nothing but the rows
is stored to know what an item is. Finished item results are cached per owner by
:func:`item_cache_key` (model, image digest, method, params, the options the result depends
on); a study that repeats or extends another reuses them without queueing anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import redis

from workers.jobqueue import TERMINAL, _json, _text, iso, job_key, queue_key, wake_key
from workers.payload import KEY_PREFIX
from workers.study_spec import STUDY_ITEM_VERSION

STUDY_STATUSES = ("running", "canceling", "succeeded", "canceled")
MAX_WAKES = 64  # wake tokens pushed per study (one per idle worker is enough)
CREATE_ATTEMPTS = 5  # optimistic transactions tried when the owner's index changes under one


def study_queue(queue_name: str) -> str:
    """The study queue's name: ``:`` cannot occur in a configured queue name, so it never collides."""
    return f"{queue_name}:studies"


def study_key(study_id: str) -> str:
    return f"{KEY_PREFIX}:study:{study_id}"


def study_image_key(study_id: str, image: int) -> str:
    return f"{KEY_PREFIX}:study:{study_id}:image:{image}"


def study_mask_key(study_id: str, row: int) -> str:
    """A manifest row's region mask (by row: rows sharing an image may have different regions)."""
    return f"{KEY_PREFIX}:study:{study_id}:mask:{row}"


def owner_studies_key(owner: str) -> str:
    return f"{KEY_PREFIX}:owner:{owner}:studies"


def item_id(study_id: str, index: int) -> str:
    return f"{study_id}-{index}"


def cache_entry_key(cache_key: str) -> str:
    return f"{KEY_PREFIX}:itemcache:{cache_key}"


def item_cache_key(owner: str, model: str, image_digest: str, method: str, params: dict[str, Any],
                   options: dict[str, Any]) -> str:
    """The cache identity of an item's result: per owner (no tenant learns what another
    explained), and every input the result depends on, in canonical JSON."""
    identity = {"v": STUDY_ITEM_VERSION, "owner": owner, "model": model, "image": image_digest, "method": method,
                "params": params, "options": options}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class NewItem:
    """One item as the API prepared it: to queue (``payload``), already known from the cache
    (``result``), or failed before it could run (``error``: its image is unreadable)."""

    index: int
    method: str
    payload: dict[str, Any] | None = None
    timeout_s: int = 600
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None


class StudyStore:
    """The study operations of the API (create, read, cancel) and of workers (spec, cache)."""

    def __init__(self, connection: redis.Redis, queue_name: str, max_losses: int = 2) -> None:
        self.redis = connection
        self.queue_name = study_queue(queue_name)
        self.max_losses = max_losses
        self._cancel = connection.register_script(_CANCEL_STUDY)

    # --- the API's side ---
    def cached_results(self, cache_keys: list[str]) -> list[dict[str, Any] | None]:
        """The cached result of each key (``None`` where there is none)."""
        if not cache_keys:
            return []
        raw = self.redis.mget([cache_entry_key(key) for key in cache_keys])
        return [json.loads(value) if value is not None else None for value in raw]

    def queued_items(self) -> int:
        return int(self.redis.llen(queue_key(self.queue_name)))

    def active(self, owner: str, scan: int = 50) -> int:
        """How many of the owner's studies (the newest ``scan``) are running or canceling."""
        return sum(f.get("status") in ("running", "canceling") for f in self.owned(owner, scan))

    def create(self, study_id: str, owner: str, record: dict[str, str], images: list[bytes], masks: dict[int, bytes],
               items: list[NewItem], *, ttl_s: int, result_ttl_s: int, max_active: int = 0) -> dict[str, str] | None:
        """Write the study, its images and every item in one transaction, and queue the items
        that must run; returns the stored study fields, or None when the owner already has
        ``max_active`` studies running (0: no limit). The count and the write are one optimistic
        transaction on the owner's index, so two submissions at once cannot both pass the limit."""
        index = owner_studies_key(owner)
        for _ in range(CREATE_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(index)
                    if max_active and self.active(owner) >= max_active:
                        return None
                    return self._write(pipe, study_id, owner, record, images, masks, items, ttl_s, result_ttl_s)
                except redis.WatchError:
                    continue  # another study of this owner was written meanwhile: count again
        raise redis.ConnectionError("the owner's study index kept changing; retry")

    def _write(self, pipe: "redis.client.Pipeline", study_id: str, owner: str, record: dict[str, str],
               images: list[bytes], masks: dict[int, bytes], items: list[NewItem], ttl_s: int,
               result_ttl_s: int) -> dict[str, str]:
        """The study's writes, queued on the watched ``pipe`` and executed as one transaction."""
        seconds, micros = self.redis.time()
        now = f"{seconds + micros / 1e6:.6f}"
        done = [item for item in items if item.result is not None or item.error is not None]
        fields = {**record, "id": study_id, "owner": owner, "status": "running", "created_at": now,
                  "total": str(len(items)), "ended": str(len(done)), "images": str(len(images)),
                  "n_succeeded": str(sum(item.result is not None for item in items)),
                  "n_failed": str(sum(item.error is not None for item in items)), "n_canceled": "0",
                  "cached": str(sum(item.result is not None for item in items)), "result_ttl": str(result_ttl_s)}
        if len(done) == len(items):
            fields.update(status="succeeded", ended_at=now)
        queue = queue_key(self.queue_name)
        pipe.multi()
        key = study_key(study_id)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, ttl_s)
        for index, data in enumerate(images):
            pipe.set(study_image_key(study_id, index), data, ex=ttl_s)
        for index, data in masks.items():
            pipe.set(study_mask_key(study_id, index), data, ex=ttl_s)
        queued = []
        for item in items:
            job_id = item_id(study_id, item.index)
            job = {"id": job_id, "queue": self.queue_name, "owner": owner, "study": study_id,
                   "created_at": now, "attempts": 0, "lost": 0, "token": 0, "result_ttl": result_ttl_s,
                   "max_lost": self.max_losses, "timeout_s": item.timeout_s,
                   "payload": _json(item.payload or {"method": item.method})}
            if item.result is not None:
                job.update(status="succeeded", progress=1, stage="cached", ended_at=now,
                           result=_json({**item.result, "cached": True}))
            elif item.error is not None:
                job.update(status="failed", progress=0, stage="failed", ended_at=now, error=_json(item.error))
            else:
                job.update(status="queued", progress=0, stage="queued")
                queued.append(job_id)
            pipe.hset(job_key(job_id), mapping=job)
            pipe.expire(job_key(job_id), ttl_s)
        for start in range(0, len(queued), 1000):
            pipe.lpush(queue, *queued[start:start + 1000])
        if queued:
            pipe.lpush(wake_key(self.queue_name), *["1"] * min(len(queued), MAX_WAKES))
            pipe.ltrim(wake_key(self.queue_name), 0, MAX_WAKES - 1)
        pipe.zadd(owner_studies_key(owner), {study_id: float(now)})
        pipe.expire(owner_studies_key(owner), ttl_s)
        pipe.execute()
        return fields

    def fields(self, study_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(study_key(study_id))
        return {_text(k): _text(v) for k, v in raw.items()} or None

    def owned(self, owner: str, limit: int) -> list[dict[str, str]]:
        """The owner's studies, newest first (expired ones dropped from the index on the way)."""
        key = owner_studies_key(owner)
        ids = [_text(value) for value in self.redis.zrevrange(key, 0, limit * 2)]
        with self.redis.pipeline(transaction=False) as pipe:
            for study_id in ids:
                pipe.hgetall(study_key(study_id))
            records = pipe.execute() if ids else []
        found, expired = [], []
        for study_id, raw in zip(ids, records):
            if raw:
                found.append({_text(k): _text(v) for k, v in raw.items()})
            else:
                expired.append(study_id)
        if expired:
            self.redis.zrem(key, *expired)
        return found[:limit]

    def items(self, study_id: str, total: int) -> list[dict[str, str]]:
        """Every item's job fields (status, result, error, attempts), in item order; an item whose
        record expired shows as ``{}``."""
        records: list[dict[str, str]] = []
        for start in range(0, total, 500):
            with self.redis.pipeline(transaction=False) as pipe:
                for index in range(start, min(start + 500, total)):
                    pipe.hmget(job_key(item_id(study_id, index)), "status", "result", "error", "attempts")
                for status, result, error, attempts in pipe.execute():
                    records.append({} if status is None else {
                        "status": _text(status), "result": _text(result) if result else "",
                        "error": _text(error) if error else "", "attempts": _text(attempts or b"0")})
        return records

    def items_at(self, study_id: str, index: int) -> dict[str, str]:
        """One item's job fields (``{}`` when its record expired)."""
        status, result = self.redis.hmget(job_key(item_id(study_id, index)), "status", "result")
        return {} if status is None else {"status": _text(status), "result": _text(result) if result else ""}

    def image(self, study_id: str, image: int) -> bytes | None:
        return self.redis.get(study_image_key(study_id, image))

    def mask(self, study_id: str, row: int) -> bytes | None:
        return self.redis.get(study_mask_key(study_id, row))

    def keep_outputs(self, study_id: str, summary: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Store the finished study's summary and rows once (the first writer wins; both are a
        pure function of the items, so a second computation is identical) and return the kept one."""
        key = study_key(study_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "summary", _json(summary))
            pipe.hsetnx(key, "rows", _json(rows))  # items.csv's rows (the manifest is field 'manifest')
            pipe.hget(key, "summary")
            *_, kept = pipe.execute()
        return json.loads(kept) if kept else summary

    def cancel(self, study_id: str, owner: str, cancel_ttl_s: int) -> str:
        """Cancel every queued item and ask running ones to stop: ``canceling`` (items still
        running), ``canceled``, ``missing`` (also another owner's), or the status it already has."""
        error = _json({"code": "canceled", "message": "the study was canceled before this item ran"})
        return _text(self._cancel(keys=[study_key(study_id), queue_key(self.queue_name)],
                                  args=[study_id, owner, error, int(cancel_ttl_s)]))

    # --- the workers' side ---
    def spec(self, study_id: str) -> str | None:
        value = self.redis.hget(study_key(study_id), "spec")
        return _text(value) if value is not None else None

    def remember(self, cache_key: str, result: dict[str, Any], ttl_s: int) -> None:
        self.redis.set(cache_entry_key(cache_key), _json(result), ex=ttl_s)


def study_view(fields: dict[str, str]) -> dict[str, Any]:
    """The public JSON of a study (without its summary) from its stored fields."""
    total = int(fields.get("total") or 0)
    ended = int(fields.get("ended") or 0)
    status = fields.get("status", "running")
    return {
        "id": fields.get("id"),
        "name": fields.get("name") or None,
        "status": status,
        "progress": {"done": ended, "total": total, "fraction": round(ended / total, 4) if total else 1.0,
                     "succeeded": int(fields.get("n_succeeded") or 0), "failed": int(fields.get("n_failed") or 0),
                     "canceled": int(fields.get("n_canceled") or 0), "cached": int(fields.get("cached") or 0)},
        "images": int(fields.get("images") or 0),
        "created_at": iso(fields.get("created_at")),
        "ended_at": iso(fields.get("ended_at")) if status in TERMINAL else None,
    }


# KEYS: study, the study queue. ARGV: id, caller (owner), canceled error JSON, cancel ttl.
# The canceled items leave the queue list in one pass (the list rebuilt without them, order
# kept), so its length, which UNBOX_STUDY_MAX_QUEUED_ITEMS bounds, counts only waiting items.
_CANCEL_STUDY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local f = redis.call('HMGET', KEYS[1], 'owner', 'status', 'total', 'result_ttl')
if not f[1] or f[1] ~= ARGV[2] then return 'missing' end
if f[2] ~= 'running' then return f[2] end
redis.call('HSET', KEYS[1], 'status', 'canceling')
local running = 0
for k = 0, tonumber(f[3]) - 1 do
  local id = ARGV[1] .. '-' .. k
  local key = 'unbox:job:' .. id
  local status = redis.call('HGET', key, 'status')
  if status == 'queued' then
    redis.call('HSET', key, 'status', 'canceled', 'ended_at', tostring(now), 'stage', 'canceled', 'error', ARGV[3])
    redis.call('EXPIRE', key, f[4])
    redis.call('HINCRBY', KEYS[1], 'n_canceled', 1)
    redis.call('HINCRBY', KEYS[1], 'ended', 1)
  elseif status == 'running' then
    redis.call('SET', 'unbox:cancel:' .. id, '1', 'EX', ARGV[4])
    running = running + 1
  end
end
local prefix = ARGV[1] .. '-'
local waiting = redis.call('LRANGE', KEYS[2], 0, -1)
local keep = {}
for _, id in ipairs(waiting) do
  if string.sub(id, 1, #prefix) ~= prefix then keep[#keep + 1] = id end
end
if #keep < #waiting then
  redis.call('DEL', KEYS[2])
  for i = 1, #keep, 1000 do redis.call('RPUSH', KEYS[2], unpack(keep, i, math.min(i + 999, #keep))) end
end
local g = redis.call('HMGET', KEYS[1], 'ended', 'total')
if tonumber(g[1]) >= tonumber(g[2]) then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'ended_at', tostring(now))
  return 'canceled'
end
return 'canceling'
"""
