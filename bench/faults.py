"""Time to recover from each fault, median of several runs, with real processes.

One stack (an embedded Redis, two ``unbox worker`` processes on the 64 px test model, the API),
the test-only ``slow`` method as the running job, and for each run of each fault the time from
the fault (or from its end) to the service doing its work again:

* worker SIGKILLed mid-job: until the job runs again on the other worker;
* worker frozen (SIGSTOP) mid-job: until the job runs again on the other worker;
* Redis paused 10 s mid-job: from SIGCONT until the job reports progress again (same attempt);
* Redis killed, restarted after 3 s: from the restart until the running job's outcome is recorded;
* a supervised worker SIGKILLed: until its replacement beats in Redis (it loads its model first).

    python -m bench.faults [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from PIL import Image

from tests.queue_support import Stack, png_of, running_stack, submitted, worker_pids
from workers.supervisor import WorkerSupervisor

LONG = json.dumps({"steps": 10000, "step_s": 0.05})
SHORT = json.dumps({"steps": 30, "step_s": 0.1})


def _until(check: Callable[[], object], timeout: float = 120.0) -> float:
    """Seconds until ``check()`` is truthy."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise TimeoutError("no recovery within the time limit")
        time.sleep(0.02)
    return time.monotonic() - began


def _view(stack: Stack, job_id: str) -> dict:
    with stack.client() as client:
        return client.get(f"/v1/jobs/{job_id}").json()


def _running(stack: Stack, image: bytes, params: str = LONG) -> str:
    with stack.client() as client:
        job_id = submitted(client, image, "slow", model="tiny", params=params)
    _until(lambda: _view(stack, job_id)["status"] == "running")
    return job_id


def _cancel(stack: Stack, job_id: str) -> None:
    with stack.client() as client:
        client.delete(f"/v1/jobs/{job_id}")
    _until(lambda: _view(stack, job_id)["status"] in ("canceled", "failed", "succeeded"))


def _replace_dead(stack: Stack) -> None:
    stack.workers[:] = [w for w in stack.workers if w.poll() is None]
    while len(stack.workers) < 2:
        stack.add_worker()


def worker_killed(stack: Stack, image: bytes) -> float:
    job_id = _running(stack, image)
    victim = stack.worker_of(job_id)
    victim.send_signal(signal.SIGKILL)
    took = _until(lambda: (v := _view(stack, job_id))["status"] == "running" and v["attempts"] == 2)
    _cancel(stack, job_id)
    _replace_dead(stack)
    return took


def worker_frozen(stack: Stack, image: bytes) -> float:
    job_id = _running(stack, image)
    victim = stack.worker_of(job_id)
    victim.send_signal(signal.SIGSTOP)
    try:
        took = _until(lambda: (v := _view(stack, job_id))["status"] == "running" and v["attempts"] == 2)
    finally:
        victim.send_signal(signal.SIGCONT)
    _cancel(stack, job_id)
    return took


def redis_paused(stack: Stack, image: bytes) -> float:
    job_id = _running(stack, image)
    stack.redis_server.process.send_signal(signal.SIGSTOP)
    time.sleep(10)
    before = None
    stack.redis_server.process.send_signal(signal.SIGCONT)
    began = time.monotonic()
    while True:
        view = _view(stack, job_id)
        if before is None:
            before = view["stage"]
        elif view["stage"] != before:
            break
        time.sleep(0.02)
    took = time.monotonic() - began
    assert view["attempts"] == 1, view
    _cancel(stack, job_id)
    return took


def redis_killed(stack: Stack, image: bytes) -> float:
    job_id = _running(stack, image, SHORT)
    time.sleep(1.2)  # past the append-only file's fsync
    stack.redis_server.process.send_signal(signal.SIGKILL)
    stack.redis_server.process.wait()
    time.sleep(3)
    stack.redis_server.start()
    took = _until(lambda: _view(stack, job_id)["status"] == "succeeded")
    return took


def supervised_worker_killed(stack: Stack, runs: int) -> list[float]:
    supervisor = WorkerSupervisor([sys.executable, "-m", "app.cli", "worker"], 1,
                                  env={**os.environ, **stack.env, "UNBOX_LOG_LEVEL": "warning"}).start()
    times = []
    try:
        _until(lambda: supervisor.pids()[0] in worker_pids(stack.redis_server.url))
        for _ in range(runs):
            old = supervisor.pids()[0]
            began = time.monotonic()
            os.kill(old, signal.SIGKILL)
            _until(lambda: (pid := supervisor.pids()[0]) not in (None, old)
                   and pid in worker_pids(stack.redis_server.url))
            times.append(time.monotonic() - began)
    finally:
        supervisor.stop(10)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from skimage import data

    image = png_of(Image.fromarray(data.chelsea()).resize((96, 64)))
    artifacts = Path(tempfile.mkdtemp(prefix="unbox-faults-"))
    rows = []
    with running_stack(artifacts, artifacts, "bench") as stack:
        for name, fault in (("worker SIGKILLed mid-job", worker_killed), ("worker frozen (SIGSTOP) mid-job",
                            worker_frozen), ("Redis paused 10 s mid-job", redis_paused),
                            ("Redis killed, restarted after 3 s", redis_killed)):
            times = [fault(stack, image) for _ in range(args.runs)]
            rows.append((name, times))
            print(name, [round(t, 2) for t in times], flush=True)
        times = supervised_worker_killed(stack, args.runs)
        rows.append(("supervised worker SIGKILLed (replacement beating)", times))
        print(rows[-1][0], [round(t, 2) for t in times], flush=True)
    print("\n| fault | median s | runs (s) |\n|---|---|---|")
    for name, times in rows:
        print(f"| {name} | {statistics.median(times):.2f} | {', '.join(f'{t:.2f}' for t in times)} |")


if __name__ == "__main__":
    main()
