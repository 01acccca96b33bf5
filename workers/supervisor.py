"""Keeps N worker processes alive: ``unbox serve``'s small stand-in for systemd / Kubernetes.

A worker can die at any time (killed by the OOM killer or an operator, a crash in native
code); the jobs it held are retried by the other workers' reapers, but with no worker left the
queue would wait forever. The supervisor starts each child in its own session (so Ctrl-C
reaches only ``unbox serve``, which then stops the workers politely), polls them from a daemon
thread, reaps every exit (no zombie is left behind) and restarts the child in that slot after
an exponential backoff: a child that keeps dying, such as one refused by a bad configuration
(exit code 2), costs one start every ``backoff_cap_s``, not a spinning CPU.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from workers.processes import describe_exit, terminate_all

logger = logging.getLogger("unbox.supervisor")

FATAL_CONFIG_EXIT = 2
"""The worker's exit code for a configuration it cannot run with (restarting will not fix it)."""


@dataclass
class _Slot:
    """One supervised position: its current child (None while waiting to restart) and its backoff."""

    number: int  # 1-based, as the logs name it
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    next_delay_s: float = 0.0
    restart_at: float | None = None
    restarts: int = 0


class WorkerSupervisor:
    """Runs ``count`` copies of ``command`` and restarts any that exits, with per-slot backoff.

    The first restart of a slot comes after ``backoff_base_s``, each further one after twice the
    previous delay, at most ``backoff_cap_s``; a child that lived ``reset_after_s`` or longer was
    healthy, so its slot starts again from ``backoff_base_s``. Exit code 2 (fatal configuration
    error) is logged as an error and never resets the backoff.
    """

    def __init__(self, command: Sequence[str], count: int = 1, *, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, name: str = "worker", backoff_base_s: float = 0.5,
                 backoff_cap_s: float = 30.0, reset_after_s: float = 60.0, poll_s: float = 0.2) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        if not 0 < backoff_base_s <= backoff_cap_s:
            raise ValueError("need 0 < backoff_base_s <= backoff_cap_s")
        self.command = list(command)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.reset_after_s = reset_after_s
        self.poll_s = poll_s
        self._slots = [_Slot(number, next_delay_s=backoff_base_s) for number in range(1, count + 1)]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- public API ---

    def start(self) -> WorkerSupervisor:
        """Start every child now (so their pids are known at once), then the watching thread.

        A child that cannot even be spawned here (missing executable, ...) raises: that is a
        broken installation, better reported at start-up than retried forever.
        """
        if self._thread is not None:
            raise RuntimeError("supervisor already started")
        with self._lock:
            try:
                for slot in self._slots:
                    self._spawn(slot)
            except OSError:
                terminate_all([s.process for s in self._slots if s.process is not None], 5.0)
                raise
        self._thread = threading.Thread(target=self._watch, name="unbox-supervisor", daemon=True)
        self._thread.start()
        return self

    def pids(self) -> list[int | None]:
        """The live child's pid in each slot; None for a slot waiting to restart (or after stop)."""
        with self._lock:
            return [slot.process.pid if slot.process is not None and slot.process.poll() is None else None
                    for slot in self._slots]

    @property
    def restarts(self) -> list[int]:
        """How many times each slot's child has been restarted (attempts: a failed spawn counts too)."""
        with self._lock:
            return [slot.restarts for slot in self._slots]

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop restarting, then SIGTERM every child (a worker finishes its current job) and
        SIGKILL those still alive after ``grace_s``. Every child is reaped before this returns."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            processes = [slot.process for slot in self._slots if slot.process is not None]
            for slot in self._slots:
                slot.restart_at = None
        terminate_all(processes, grace_s)

    def __enter__(self) -> WorkerSupervisor:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- the watching thread ---

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            try:
                with self._lock:
                    if self._stopping.is_set():  # stop() may have begun while we waited for the lock
                        return
                    self._check(time.monotonic())
            except Exception:  # the watcher must outlive any surprise, or nothing restarts again
                logger.exception("supervisor check failed")

    def _check(self, now: float) -> None:
        """Reap exited children and schedule their restarts; start those whose delay is over."""
        for slot in self._slots:
            process = slot.process
            if process is not None and process.poll() is not None:  # poll() reaps: no zombie
                slot.process = None
                what = f"{self._label(slot)} (pid {process.pid}) {describe_exit(process.returncode)}"
                if process.returncode == FATAL_CONFIG_EXIT:
                    self._schedule(slot, now, what + ", its fatal configuration error (a restart will not fix "
                                   "the configuration; see its log above)", error=True, may_reset=False)
                else:
                    healthy = now - slot.started_at >= self.reset_after_s
                    self._schedule(slot, now, what, error=False, may_reset=healthy)
            elif process is None and slot.restart_at is not None and now >= slot.restart_at:
                slot.restart_at = None
                slot.restarts += 1
                try:
                    self._spawn(slot)
                except OSError as exc:
                    self._schedule(slot, time.monotonic(), f"could not start {self._label(slot)}: {exc}",
                                   error=True, may_reset=False)
                    continue
                logger.warning("%s restarted: pid %d (restart %d)", self._label(slot), slot.process.pid,
                               slot.restarts)

    def _schedule(self, slot: _Slot, now: float, what: str, error: bool, may_reset: bool) -> None:
        """Log ``what`` happened and set the slot's restart time from its backoff.

        ``may_reset``: the child lived long enough to count as healthy, so the backoff starts over.
        """
        if may_reset:
            slot.next_delay_s = self.backoff_base_s
        delay = slot.next_delay_s
        slot.next_delay_s = min(delay * 2, self.backoff_cap_s)
        slot.restart_at = now + delay
        (logger.error if error else logger.warning)("%s; restarting in %.1f s", what, delay)

    def _spawn(self, slot: _Slot) -> None:
        slot.process = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, start_new_session=True)
        slot.started_at = time.monotonic()

    def _label(self, slot: _Slot) -> str:
        return f"{self.name} {slot.number}"
