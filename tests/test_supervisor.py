"""The worker supervisor with real child processes: a killed child is reaped (no zombie) and
restarted in its own slot only; a child that keeps failing is restarted with a growing delay,
never in a tight loop; stop() ends every child (SIGKILL after the grace period) and nothing
restarts afterwards."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from workers.supervisor import WorkerSupervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _until(predicate: Callable[[], object], timeout: float = 5.0) -> object:
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")


def _reaped(pid: int) -> bool:
    """True when ``pid`` (a child of this process) is gone, not even a zombie."""
    if Path(f"/proc/{pid}").exists():
        return False
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def _delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [float(m.group(1)) for r in caplog.records if r.name == "unbox.supervisor"
            if (m := re.search(r"restarting in ([\d.]+) s", r.getMessage()))]


def test_a_killed_child_is_reaped_and_restarted_in_its_own_slot(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="unbox.supervisor")
    supervisor = WorkerSupervisor(SLEEPER, 2, backoff_base_s=0.2, poll_s=0.05).start()
    try:
        first, second = supervisor.pids()
        assert first and second and first != second
        os.kill(first, signal.SIGKILL)
        replacement = _until(lambda: (pid := supervisor.pids()[0]) not in (None, first) and pid)
        assert supervisor.pids() == [replacement, second]  # the other slot is untouched
        assert supervisor.restarts == [1, 0]
        assert _reaped(first), "the killed child is still a zombie"
        messages = [r.getMessage() for r in caplog.records if r.name == "unbox.supervisor"]
        assert f"worker 1 (pid {first}) was killed by SIGKILL; restarting in 0.2 s" in messages
        assert f"worker 1 restarted: pid {replacement} (restart 1)" in messages
    finally:
        supervisor.stop(grace_s=5)
    assert all(_reaped(pid) for pid in (replacement, second))


def test_a_child_failing_with_code_2_backs_off_instead_of_spinning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="unbox.supervisor")
    supervisor = WorkerSupervisor([sys.executable, "-c", "raise SystemExit(2)"], 1, backoff_base_s=0.1,
                                  backoff_cap_s=0.4, poll_s=0.02).start()
    try:
        time.sleep(2.0)  # the point is how few restarts fit in this window
        restarts = supervisor.restarts[0]
    finally:
        supervisor.stop(grace_s=5)
    # 0.1 + 0.2 + 0.4 + 0.4 + ... (plus ~0.1 s per Python start-up): a handful, not hundreds
    assert 2 <= restarts <= 10, restarts
    delays = _delays(caplog)
    assert len(delays) >= 2 and delays == [min(0.1 * 2 ** i, 0.4) for i in range(len(delays))], delays
    exits = [r for r in caplog.records if "exited with code 2" in r.getMessage()]
    assert exits and all(r.levelno == logging.ERROR for r in exits)
    assert "fatal configuration error" in exits[0].getMessage()


def test_backoff_starts_over_after_a_child_lived_long_enough(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="unbox.supervisor")
    supervisor = WorkerSupervisor([sys.executable, "-c", "import time; time.sleep(0.4); raise SystemExit(1)"], 1,
                                  backoff_base_s=0.1, backoff_cap_s=5, reset_after_s=0.3, poll_s=0.02).start()
    try:
        _until(lambda: supervisor.restarts[0] >= 3, timeout=10)
    finally:
        supervisor.stop(grace_s=5)
    delays = _delays(caplog)
    assert len(delays) >= 3 and set(delays) == {0.1}, delays  # each child was "healthy": no doubling


def test_stop_ends_every_child_and_nothing_restarts(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    stubborn = [sys.executable, "-c", "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, "
                f"signal.SIG_IGN); pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"]
    polite = WorkerSupervisor(SLEEPER, 2, backoff_base_s=0.1, poll_s=0.05).start()
    deaf = WorkerSupervisor(stubborn, 1, backoff_base_s=0.1, poll_s=0.05).start()
    pids = polite.pids()
    (deaf_pid,) = deaf.pids()
    _until(ready.exists)  # its SIGTERM handler is in place
    started = time.monotonic()
    polite.stop(grace_s=5)
    assert time.monotonic() - started < 3, "SIGTERM should have stopped the sleepers at once"
    started = time.monotonic()
    deaf.stop(grace_s=0.5)
    assert time.monotonic() - started >= 0.5  # waited the grace period, then SIGKILLed
    for pid in (*pids, deaf_pid):
        assert _reaped(pid)
    time.sleep(0.5)  # ten poll periods: a restart, if any were coming, would have happened
    assert polite.pids() == [None, None] and deaf.pids() == [None]
    assert polite.restarts == [0, 0] and deaf.restarts == [0]
