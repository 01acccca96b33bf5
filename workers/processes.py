"""Stopping child processes politely: SIGTERM first, SIGKILL only after a grace period."""

from __future__ import annotations

import subprocess


def terminate(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM ``process`` (a worker finishes its job first), then SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
