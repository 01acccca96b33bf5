"""API keys: a TOML file of key records, each holding a hash of its secret, never the secret.

A key reads ``ubx_<id>_<secret>``: the id finds the record, the secret (32 random bytes,
URL-safe base64) is checked against the record's SHA-256 hash in constant time. A random
256-bit secret needs no slow password hash (as with GitHub's and Stripe's tokens): a leaked
file does not reveal any key. The file is written atomically with mode 0600 and re-read by the
API when its modification time or size changes, so ``unbox keys add`` / ``revoke`` take effect
without a restart.

File format::

    [[keys]]
    id = "3f9a1c2b7d4e"
    name = "radiology-dashboard"
    hash = "sha256:<hex>"
    scopes = ["predict", "explain", "jobs"]
    created_at = "2026-12-01T12:00:00Z"
    rate_limit_per_minute = 120   # optional: overrides UNBOX_RATE_LIMIT_PER_MINUTE
    max_queued_jobs = 50          # optional: overrides UNBOX_MAX_QUEUED_JOBS_PER_KEY
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger("unbox.auth")

SCOPES = ("predict", "explain", "jobs", "admin")
KEY_PREFIX = "ubx_"
_KEY = re.compile(r"^ubx_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")
RELOAD_CHECK_S = 1.0


class KeyFileError(ValueError):
    """The key file cannot be read, or a key operation is invalid; the message is for humans."""


@dataclass(frozen=True)
class ApiKey:
    """One key's record (its secret's hash, never the secret)."""

    id: str
    name: str
    hash: str
    scopes: tuple[str, ...]
    created_at: str
    rate_limit_per_minute: int | None = None
    max_queued_jobs: int | None = None

    def public(self) -> dict[str, object]:
        """What ``unbox keys list`` shows: everything but the hash."""
        return {"id": self.id, "name": self.name, "scopes": list(self.scopes), "created_at": self.created_at,
                "rate_limit_per_minute": self.rate_limit_per_minute, "max_queued_jobs": self.max_queued_jobs}


def hash_secret(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()


def parse_scopes(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validated scope names from ``predict,explain`` (or a list), in the canonical order."""
    names = [part.strip() for part in (text.split(",") if isinstance(text, str) else text) if part.strip()]
    unknown = sorted(set(names) - set(SCOPES))
    if unknown:
        raise KeyFileError(f"unknown scopes {unknown}; known: {', '.join(SCOPES)}")
    if not names:
        raise KeyFileError(f"a key needs at least one scope of {', '.join(SCOPES)}")
    return tuple(scope for scope in SCOPES if scope in names)


def _optional_limit(entry: dict, name: str, where: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise KeyFileError(f"{where}: {name} must be a positive integer")
    return value


def _record(entry: object, index: int) -> ApiKey:
    where = f"key #{index + 1}"
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where} is not a table")
    try:
        key_id, name, digest = str(entry["id"]), str(entry["name"]), str(entry["hash"])
    except KeyError as exc:
        raise KeyFileError(f"{where} has no {exc.args[0]!r}") from None
    if not re.fullmatch(r"[0-9a-f]{12}", key_id):
        raise KeyFileError(f"{where}: id must be 12 hex digits")
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise KeyFileError(f"{where} ({key_id}): hash must be sha256:<64 hex digits>")
    return ApiKey(id=key_id, name=name, hash=digest, scopes=parse_scopes(list(entry.get("scopes") or [])),
                  created_at=str(entry.get("created_at", "")),
                  rate_limit_per_minute=_optional_limit(entry, "rate_limit_per_minute", where),
                  max_queued_jobs=_optional_limit(entry, "max_queued_jobs", where))


def read_keys(path: Path) -> dict[str, ApiKey]:
    """The keys in ``path`` by id; a missing file holds none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeyFileError(f"the key file {path} is not valid TOML: {exc}") from None
    entries = document.get("keys", [])
    if not isinstance(entries, list):
        raise KeyFileError(f"the key file {path}: 'keys' must be an array of tables ([[keys]])")
    keys: dict[str, ApiKey] = {}
    for index, entry in enumerate(entries):
        record = _record(entry, index)
        if record.id in keys:
            raise KeyFileError(f"the key file {path} lists key {record.id} twice")
        keys[record.id] = record
    return keys


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def write_keys(path: Path, keys: dict[str, ApiKey]) -> None:
    """Replace ``path`` atomically (write a sibling, fsync, rename) with mode 0600."""
    lines = ["# Unbox API keys: hashes only (the keys themselves were shown once, when created).",
             "# Manage with `unbox keys add | list | revoke`.", ""]
    for key in keys.values():
        lines += ["[[keys]]", f"id = {_toml_string(key.id)}", f"name = {_toml_string(key.name)}",
                  f"hash = {_toml_string(key.hash)}",
                  "scopes = [" + ", ".join(_toml_string(scope) for scope in key.scopes) + "]",
                  f"created_at = {_toml_string(key.created_at)}"]
        if key.rate_limit_per_minute is not None:
            lines.append(f"rate_limit_per_minute = {key.rate_limit_per_minute}")
        if key.max_queued_jobs is not None:
            lines.append(f"max_queued_jobs = {key.max_queued_jobs}")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def add_key(path: Path, name: str, scopes: tuple[str, ...], rate_limit_per_minute: int | None = None,
            max_queued_jobs: int | None = None) -> tuple[ApiKey, str]:
    """Create a key, store its hash in ``path``; returns the record and the key (shown once)."""
    if not _NAME.match(name):
        raise KeyFileError("a key name is 1-64 letters, digits, spaces or ._@- and starts with a letter or digit")
    keys = read_keys(path)
    key_id = secrets.token_hex(6)
    while key_id in keys:
        key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    token = f"{KEY_PREFIX}{key_id}_{secret}"
    record = ApiKey(id=key_id, name=name, hash=hash_secret(token), scopes=parse_scopes(scopes),
                    created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    rate_limit_per_minute=rate_limit_per_minute, max_queued_jobs=max_queued_jobs)
    write_keys(path, {**keys, key_id: record})
    return record, token


def revoke_key(path: Path, key_id: str) -> ApiKey:
    """Remove key ``key_id`` from ``path`` (it stops working at the API's next check)."""
    keys = read_keys(path)
    if key_id not in keys:
        raise KeyFileError(f"no key {key_id!r} in {path}")
    record = keys.pop(key_id)
    write_keys(path, keys)
    return record


@dataclass
class KeyRing:
    """The API's view of the key file: looks keys up, re-reading the file when it changed.

    A file that becomes unreadable or invalid keeps the last good keys (logged as an error) so
    that a half-finished hand edit does not lock every client out; a deleted file holds no keys.
    """

    path: Path
    keys: dict[str, ApiKey] = field(default_factory=dict)
    _signature: tuple[int, int] | None = None
    _checked: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.keys = read_keys(self.path)  # start-up: an invalid file is a configuration error
        self._signature = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int] | None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        return info.st_mtime_ns, info.st_size

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked = now
            signature = self._stat()
            if signature == self._signature and not force:
                return
            try:
                keys = read_keys(self.path)
            except KeyFileError as exc:
                logger.error("keeping the previous API keys: %s", exc)
                return
            self.keys, self._signature = keys, signature
            logger.info("API keys reloaded from %s (%d keys)", self.path, len(keys))

    def lookup(self, token: str) -> ApiKey | None:
        """The record of a presented key, or ``None`` when it is malformed, unknown or revoked."""
        match = _KEY.match(token)
        if match is None:
            return None
        self.refresh()
        record = self.keys.get(match.group(1))
        if record is None or not hmac.compare_digest(record.hash, hash_secret(token)):
            return None
        return record
