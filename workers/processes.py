"""Stopping child processes politely: SIGTERM first, SIGKILL only after a grace period."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterable


def terminate(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM ``process`` (a worker finishes its job first), then SIGKILL after ``grace_s``."""
    terminate_all([process], grace_s)


def terminate_all(processes: Iterable[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every live process at once, then SIGKILL those still alive after ``grace_s``.

    One shared deadline, so N workers stop within ``grace_s`` rather than N times it; every
    process is waited for (reaped), so none is left a zombie.
    """
    live = [process for process in processes if process.poll() is None]
    for process in live:
        process.terminate()  # a no-op for one that has exited meanwhile
    deadline = time.monotonic() + grace_s
    for process in live:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``, from a ``Popen.returncode``."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"
