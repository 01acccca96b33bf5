"""Studies through the queue: items per second, per-item overhead, Redis bytes, a cached repeat.

Starts, per worker count, a fresh stack (embedded Redis, ``unbox api`` and ``unbox worker``
processes, each with ``--torch-threads`` intra-op threads) and submits studies of ``--images``
distinct photos (the scikit-image samples chelsea, coffee, astronaut, rocket and camera, with
flips and crops, long side 320) on efficientnet_lite0 with Grad-CAM, then measures in one run:

1. items per second with 1 and with 2 workers, for a study with deletion / insertion
   (``faithfulness`` of ``--steps`` steps) and one without analyses, timed from the 202 to the
   first ``GET /v1/studies/{id}`` that says succeeded (each run has its own ``top_k``, so no
   item comes from the cache);
2. the per-item overhead, with 1 worker: the study item computed in this process
   (:func:`workers.study_item.run_study_item`, 1 thread), what the worker reports for it, and the
   wall time per item, against the same number of plain ``POST /v1/jobs`` Grad-CAM jobs
   submitted together and polled to completion;
3. the Redis bytes of a finished study: ``MEMORY USAGE`` of its hash, its images, every item's
   job hash and the cache entries, and the ``used_memory`` delta, per item;
4. the identical study submitted again: every item answered from the cache.

Prints one markdown table per part (``--section FILE`` also writes them as a docs section).

    python -m bench.study [--images 24] [--steps 8] [--torch-threads 1] [--section FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image, ImageOps

from workers.jobqueue import job_key
from workers.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]
MODEL = "efficientnet_lite0"
SIDE = 320
POLL_S = 0.05
TERMINAL = {"succeeded", "failed", "canceled"}


# ----- the images -------------------------------------------------------------------------------
def _fit(image: Image.Image, side: int = SIDE) -> Image.Image:
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BILINEAR)


def _crop(image: Image.Image, keep: float, corner: int) -> Image.Image:
    """``keep`` of each side, anchored at one of four corners."""
    width, height = round(image.width * keep), round(image.height * keep)
    left = 0 if corner in (0, 2) else image.width - width
    top = 0 if corner in (0, 1) else image.height - height
    return image.crop((left, top, left + width, top + height))


def photos(count: int, side: int = SIDE) -> dict[str, Image.Image]:
    """``count`` distinct RGB images: the five sample photos, then their mirrors, then crops
    (90 %, 80 %, ... of each side, at rotating corners) and their mirrors."""
    from skimage import data

    bases = {name: Image.fromarray(getattr(data, name)()).convert("RGB")
             for name in ("chelsea", "coffee", "astronaut", "rocket", "camera")}
    images: dict[str, Image.Image] = {}
    digests: set[str] = set()
    variant = 0
    while len(images) < count:
        mirrored, level = variant % 2 == 1, variant // 2
        for name, base in bases.items():
            if len(images) == count:
                break
            image = _crop(base, 1.0 - 0.1 * level, level % 4) if level else base
            image = _fit(ImageOps.mirror(image) if mirrored else image, side)
            digest = hashlib.sha256(image.tobytes()).hexdigest()
            if digest in digests:  # cannot happen with these crops; kept so the study never dedupes
                continue
            digests.add(digest)
            images[f"{name}_{'m' if mirrored else 'o'}{level}.png"] = image
        variant += 1
    return images


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def archive_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs do not compress further
        for name, data in files.items():
            archive.writestr(f"photos/{name}", data)
    return buffer.getvalue()


def study_spec(name: str, top_k: int, steps: int | None) -> dict[str, Any]:
    return {"name": name, "models": [MODEL], "methods": [{"name": "gradcam", "params": {"top_k": top_k}}],
            "analyses": {"faithfulness": {"steps": steps}} if steps else {}}


# ----- the stack --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """An embedded Redis, one API and ``workers`` workers, started side by side."""

    def __init__(self, workers: int, torch_threads: int, logs: Path) -> None:
        self.redis_server = EmbeddedRedis().start()
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {"UNBOX_REDIS_URL": self.redis_server.url, "UNBOX_HOST": "127.0.0.1", "UNBOX_PORT": str(port),
                    "UNBOX_LOG_LEVEL": "warning", "UNBOX_MODELS": MODEL, "UNBOX_TORCH_THREADS": str(torch_threads),
                    "UNBOX_RATE_LIMIT_PER_MINUTE": "0", "UNBOX_MAX_QUEUE_LENGTH": "1000"}
        self.logs = logs
        self.processes: list[subprocess.Popen] = []
        try:
            self.processes.append(self._spawn("api", "api"))
            for n in range(workers):
                self.processes.append(self._spawn("worker", f"worker{n}"))
            self._wait_ready()
            self._wait_workers(workers)
        except BaseException:
            self.close()
            raise

    def _spawn(self, command: str, log_name: str) -> subprocess.Popen:
        log = open(self.logs / f"{log_name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "app.cli", command], cwd=REPO,
                                env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT)

    def _check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                tails = "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}"
                                  for path in sorted(self.logs.glob("*.log")))
                raise SystemExit(f"a stack process exited with {process.returncode}\n{tails}")

    def _wait_ready(self) -> None:
        for _ in range(1500):
            self._check_alive()
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("the API did not become ready")

    def _wait_workers(self, count: int) -> None:
        from workers.jobqueue import JobStore

        store = JobStore(self.redis(), "unbox", 2.0)
        for _ in range(1500):
            self._check_alive()
            if sum(1 for worker in store.workers() if worker["alive"]) >= count:
                return
            time.sleep(0.2)
        raise SystemExit(f"{count} worker(s) did not register")

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_server.url)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.redis_server.close()


# ----- measuring --------------------------------------------------------------------------------
def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_study(client: httpx.Client, archive: bytes, spec: dict[str, Any]) -> dict[str, Any]:
    """Submit a study and poll it until it ended: the client's and the server's times."""
    began = time.perf_counter()
    response = client.post("/v1/studies", files={"archive": ("study.zip", archive, "application/zip")},
                           data={"spec": json.dumps(spec)})
    accepted = time.perf_counter()
    if response.status_code != 202:
        raise SystemExit(f"the study was not accepted: {response.status_code} {response.text[:500]}")
    first = response.json()
    study_id = first["id"]
    while True:
        view = client.get(f"/v1/studies/{study_id}").json()
        if view["status"] in TERMINAL:
            break
        time.sleep(POLL_S)
    ended = time.perf_counter()
    if view["status"] != "succeeded" or view["progress"]["failed"]:
        raise SystemExit(f"study {study_id} {view['status']}: {view['progress']}")
    return {"id": study_id, "items": view["progress"]["total"], "cached": view["progress"]["cached"],
            "accepted_status": first["status"], "submit_s": accepted - began, "wall_s": ended - accepted,
            "server_s": _stamp(view["ended_at"]) - _stamp(view["created_at"]), "total_s": ended - began}


def item_records(connection: Any, study_id: str, total: int) -> list[dict[str, str]]:
    from workers.study_store import item_id

    records = []
    for index in range(total):
        raw = connection.hgetall(job_key(item_id(study_id, index)))
        records.append({key.decode(): value.decode() for key, value in raw.items()})
    return records


def worker_side(records: list[dict[str, str]], timing_field: str) -> dict[str, float]:
    """Means over the items (or jobs) of what the worker reported: its compute (``timing_ms``)
    and how long it held each one (started_at to ended_at, Redis's clock)."""
    computed = [json.loads(record["result"])["timing_ms"][timing_field] for record in records]
    held = [(float(record["ended_at"]) - float(record["started_at"])) * 1e3 for record in records]
    return {"compute_ms": statistics.fmean(computed), "held_ms": statistics.fmean(held)}


def run_jobs(client: httpx.Client, images: list[bytes], top_k: int) -> dict[str, Any]:
    """Submit one plain Grad-CAM job per image, all at once, then poll them all until they ended."""
    began = time.perf_counter()
    pending = []
    for n, image in enumerate(images):
        response = client.post("/v1/jobs", files={"image": (f"{n}.png", image, "image/png")},
                               data={"method": "gradcam", "model": MODEL, "params": json.dumps({"top_k": top_k})})
        if response.status_code != 202:
            raise SystemExit(f"the job was not accepted: {response.status_code} {response.text[:500]}")
        pending.append(response.json()["id"])
    submitted = time.perf_counter()
    ids = list(pending)
    while pending:
        for job_id in list(pending):
            view = client.get(f"/v1/jobs/{job_id}").json()
            if view["status"] in TERMINAL:
                if view["status"] != "succeeded":
                    raise SystemExit(f"job {job_id} {view['status']}: {view.get('error')}")
                pending.remove(job_id)
        if pending:
            time.sleep(POLL_S)
    ended = time.perf_counter()
    return {"ids": ids, "submit_s": submitted - began, "wall_s": ended - began}


def redis_bytes(connection: Any, study_id: str, total: int, images: int) -> dict[str, Any]:
    """``MEMORY USAGE`` (all samples) of every key of a finished study, by kind."""
    from workers.study_store import cache_entry_key, item_id, study_image_key, study_key

    def usage(key: str) -> int:
        return int(connection.memory_usage(key, samples=0) or 0)

    item_keys = [job_key(item_id(study_id, index)) for index in range(total)]
    cache_keys = []
    for key in item_keys:
        payload = json.loads(connection.hget(key, "payload"))
        cache_keys.append(cache_entry_key(payload["study"]["cache_key"]))
    kinds = {"study hash": [study_key(study_id)],
             "image blob": [study_image_key(study_id, index) for index in range(images)],
             "item job hash": item_keys, "cache entry": cache_keys}
    known = {key for keys in kinds.values() for key in keys}
    others = sorted(key.decode() for key in connection.scan_iter(match=f"*{study_id}*", count=1000)
                    if key.decode() not in known)
    kinds["other keys naming the study"] = others
    return {kind: [usage(key) for key in keys] for kind, keys in kinds.items()}


def job_bytes(connection: Any, job_ids: list[str]) -> list[int]:
    """For comparison, per plain job: ``MEMORY USAGE`` of every key naming it (its hash, its pictures)."""
    return [sum(int(connection.memory_usage(key, samples=0) or 0)
                for key in connection.scan_iter(match=f"*{job_id}*", count=1000)) for job_id in job_ids]


def in_process(images: list[Image.Image], steps: int, top_k: int, threads: int) -> dict[str, float]:
    """Mean ms per image of the study item (with and without deletion / insertion) and of the
    plain Grad-CAM job's method, computed here as a worker would, warm."""
    from core.settings import CoreSettings
    from models import ModelRegistry, load_catalog
    from workers.methods import get_method
    from workers.study_item import run_study_item
    from workers.study_spec import StudySpec

    torch.set_num_threads(threads)
    settings = CoreSettings()
    model = ModelRegistry(load_catalog(settings.catalog), "cpu", settings.execution_policy()).get(MODEL)
    job = get_method("gradcam")
    job_params = job.params.model_validate({"top_k": top_k})
    specs = {"with": StudySpec.model_validate(study_spec("in process", top_k, steps)),
             "without": StudySpec.model_validate(study_spec("in process", top_k, None))}

    def quiet(_fraction: float, _stage: str) -> None:
        return None

    runs = {
        "item_with": lambda image: run_study_item(model, image, "gradcam", None, {"top_k": top_k}, None,
                                                  specs["with"], None, quiet),
        "item_without": lambda image: run_study_item(model, image, "gradcam", None, {"top_k": top_k}, None,
                                                     specs["without"], None, quiet),
        "job": lambda image: job.run(model, image, None, job_params, quiet, settings),
    }
    out = {}
    for name, run in runs.items():
        for image in images[:2]:
            run(image)  # warm
        began = time.perf_counter()
        for image in images:
            run(image)
        out[name] = (time.perf_counter() - began) * 1e3 / len(images)
    return out


def used_memory(connection: Any) -> int:
    return int(connection.info("memory")["used_memory"])


# ----- the report -------------------------------------------------------------------------------
def machine() -> str:
    cpu, cores = platform.processor() or platform.machine(), str(os.cpu_count())
    try:
        listed = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in listed.splitlines() if ":" in line)
        cpu = fields.get("Model name", cpu).strip()
        cores = fields.get("CPU(s)", cores).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {cores} cores"


def load() -> str:
    try:
        return " / ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="distinct images per study (one item each)")
    parser.add_argument("--steps", type=int, default=8, help="deletion / insertion steps of the analysed study")
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated (the first runs parts 2-4)")
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of the API and each worker")
    parser.add_argument("--section", type=Path, help="also write the tables as a markdown section to this file")
    args = parser.parse_args(argv)
    counts = [int(value) for value in args.workers.split(",")]
    if not 1 <= args.images <= 60 or min(counts) < 1:
        parser.error("--images is 1 to 60 (the crops run out after that) and worker counts are at least 1")
    command = ("python -m bench.study " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    started_at = datetime.now(timezone.utc)
    load_at_start = load()

    pictures = photos(args.images + 2 * max(counts))  # the last ones warm each stack up (2 per worker)
    warm_pictures, pictures = dict(list(pictures.items())[args.images:]), dict(list(pictures.items())[:args.images])
    files = {name: png(image) for name, image in pictures.items()}
    archive, warm_archive = archive_of(files), archive_of({name: png(image) for name, image in warm_pictures.items()})
    n = args.images

    print(f"in-process items ({n} images, {args.torch_threads} thread(s)) ...", flush=True)
    local = in_process(list(pictures.values()), args.steps, 3, args.torch_threads)

    top_k = iter(range(4, 100))  # every uncached run its own top_k: no item is answered from the cache
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    records: dict[str, list[dict[str, str]]] = {}
    memory: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="unbox-bench-study-") as folder:
        for count in counts:
            print(f"stack with {count} worker(s) ...", flush=True)
            stack = Stack(count, args.torch_threads, Path(folder))
            try:
                connection = stack.redis()
                with httpx.Client(base_url=stack.url, timeout=300) as client:
                    run_study(client, warm_archive, study_spec("warm-up", 1, args.steps))
                    run_study(client, warm_archive, study_spec("warm-up", 2, None))
                    result: dict[str, dict[str, Any]] = {}
                    before = used_memory(connection)
                    spec_with = study_spec("with faithfulness", next(top_k), args.steps)
                    result["with"] = run_study(client, archive, spec_with)
                    after = used_memory(connection)
                    result["without"] = run_study(client, archive, study_spec("no analyses", next(top_k), None))
                    if count == counts[0]:
                        sid = result["with"]["id"]
                        records["with"] = item_records(connection, sid, n)
                        records["without"] = item_records(connection, result["without"]["id"], n)
                        memory = {"keys": redis_bytes(connection, sid, n, n), "delta": after - before}
                        result["cached"] = run_study(client, archive, spec_with)
                        jobs_top_k = next(top_k)
                        run_jobs(client, [files[name] for name in list(files)[:1]], jobs_top_k)  # warm the job path
                        result["jobs"] = run_jobs(client, list(files.values()), jobs_top_k)
                        records["jobs"] = [{key.decode(): value.decode() for key, value in
                                            connection.hgetall(job_key(job_id)).items()}
                                           for job_id in result["jobs"]["ids"]]
                        memory["jobs"] = job_bytes(connection, result["jobs"]["ids"])
                    runs[count] = result
            finally:
                stack.close()
    load_at_end = load()

    # part 1: items per second
    one = counts[0]
    rows1 = ["| workers | study | items | POST -> 202 (s) | 202 -> succeeded (s) | server created -> ended (s) "
             "| items/s | vs first count |", "|---|---|---|---|---|---|---|---|"]
    for kind, label in (("with", f"Grad-CAM + deletion/insertion ({args.steps} steps)"), ("without", "Grad-CAM only")):
        for count in counts:
            run = runs[count][kind]
            rate = run["items"] / run["wall_s"]
            base = runs[one][kind]["items"] / runs[one][kind]["wall_s"]
            rows1.append(f"| {count} | {label} | {run['items']} | {run['submit_s']:.2f} | {run['wall_s']:.2f} | "
                         f"{run['server_s']:.2f} | {rate:.2f} | {rate / base:.2f}x |")

    # part 2: per-item overhead (1st worker count)
    jobs = runs[one]["jobs"]
    side_with, side_without = worker_side(records["with"], "total"), worker_side(records["without"], "total")
    side_jobs = worker_side(records["jobs"], "job")
    rows2 = ["| per item, ms (1 worker) | in-process compute | worker: compute (timing_ms) | worker: held "
             "(started -> ended) | wall per item | wall - in-process |", "|---|---|---|---|---|---|"]
    for label, key, side, wall_s in (
            (f"study item, Grad-CAM + deletion/insertion ({args.steps} steps)", "item_with", side_with,
             runs[one]["with"]["wall_s"]),
            ("study item, Grad-CAM only (`analyses: {}`)", "item_without", side_without,
             runs[one]["without"]["wall_s"]),
            ("plain `POST /v1/jobs` Grad-CAM job (first POST -> last succeeded)", "job", side_jobs,
             jobs["wall_s"])):
        wall = wall_s * 1e3 / n
        rows2.append(f"| {label} | {local[key]:.1f} | {side['compute_ms']:.1f} | {side['held_ms']:.1f} | "
                     f"{wall:.1f} | {wall - local[key]:.1f} |")
    rows2.append(f"\n{n} jobs submitted in {jobs['submit_s']:.2f} s (sequential POSTs, while the worker ran "
                 f"them); jobs/s {n / jobs['wall_s']:.2f} against study items/s "
                 f"{n / runs[one]['without']['wall_s']:.2f} (Grad-CAM only) and "
                 f"{n / runs[one]['with']['wall_s']:.2f} (with deletion/insertion).")

    # part 3: Redis bytes
    keys = memory["keys"]
    upload = statistics.fmean(len(data) for data in files.values())
    rows3 = ["| keys of the finished study (MEMORY USAGE, SAMPLES 0) | count | bytes each (mean) | bytes per item |",
             "|---|---|---|---|"]
    total_bytes = 0
    for kind, sizes in keys.items():
        total_bytes += sum(sizes)
        each = f"{statistics.fmean(sizes):,.0f}" if sizes else "-"
        rows3.append(f"| {kind} | {len(sizes)} | {each} | {sum(sizes) / n:,.0f} |")
    rows3.append(f"| all of them | {sum(len(sizes) for sizes in keys.values())} | - | {total_bytes / n:,.0f} |")
    rows3.append(f"| INFO used_memory delta (submit -> succeeded) | - | - | {memory['delta'] / n:,.0f} |")
    rows3.append(f"| for comparison: a finished plain Grad-CAM job, all its keys | {len(memory['jobs'])} | "
                 f"{statistics.fmean(memory['jobs']):,.0f} | - |")
    rows3.append(f"\nuploaded PNGs: {upload:,.0f} bytes each on average; archive {len(archive):,} bytes.")

    # part 4: the cached repeat
    cached, first = runs[one]["cached"], runs[one]["with"]
    rows4 = ["| identical study again (1 worker) | items | cached | status in the 202 | POST -> 202 (s) "
             "| POST -> succeeded (s) | items/s | vs uncached (202 -> succeeded) |",
             "|---|---|---|---|---|---|---|---|"]
    rate = cached["items"] / cached["total_s"]
    rows4.append(f"| Grad-CAM + deletion/insertion ({args.steps} steps) | {cached['items']} | {cached['cached']} | "
                 f"{cached['accepted_status']} | {cached['submit_s']:.2f} | {cached['total_s']:.2f} | {rate:.1f} | "
                 f"{rate / (first['items'] / first['wall_s']):.1f}x |")

    header = (f"- machine: {machine()} (shared, load average {load_at_start} at start, {load_at_end} at end); "
              f"device cpu; torch {torch.__version__}, python {platform.python_version()}\n"
              f"- {started_at.strftime('%Y-%m-%d %H:%M')} UTC; `{command}`\n"
              f"- {MODEL}, Grad-CAM, {n} distinct images (sample photos, mirrors, crops; long side {SIDE} px, PNG) "
              f"in one zip, one item each; {args.torch_threads} torch thread(s) per API and worker process; "
              f"embedded Redis on the same machine; a fresh stack per worker count, warmed with a "
              f"{len(warm_pictures)}-image study of each spec (and, for the plain jobs, one job); "
              f"in-process figures are this process's own, warm, 1 thread; polled every {POLL_S * 1e3:.0f} ms")
    tables = [("Items per second", rows1), ("Per-item overhead against a plain job", rows2),
              ("Redis bytes of the finished study (with deletion/insertion, 1 worker)", rows3),
              ("A cached repeat", rows4)]
    body = "\n\n".join(f"**{title}**\n\n" + "\n".join(rows) for title, rows in tables)
    print(header + "\n\n" + body)
    if args.section is not None:
        stamp = started_at.strftime("%Y-%m-%d %H:%M")
        args.section.write_text(f"## Studies: items per second, overhead, Redis bytes ({stamp} UTC)\n\n"
                                f"{header}\n\n{body}\n", encoding="utf-8")
        print(f"written to {args.section}")


if __name__ == "__main__":
    main()
