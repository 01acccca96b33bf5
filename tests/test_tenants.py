"""Tenants: API keys, scopes, job ownership, rate limits, queue quotas and CORS, through real HTTP
against a real stack (Redis, a worker and the API; two API processes for the shared limits).

Keys are made with the real CLI (``unbox keys add``), as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import REPO, start_api, stop
from tests.queue_support import Stack, png_of, running_stack, wait_for

ORIGIN = "https://dash.example.org"
LONG = json.dumps({"steps": 10000, "step_s": 0.05})


def add_key(keys_file: Path, name: str, *options: str) -> str:
    """``unbox keys add``; the key is the last line of its standard output."""
    done = subprocess.run([sys.executable, "-m", "app.cli", "keys", "add", name, *options], cwd=REPO,
                          env={**os.environ, "UNBOX_API_KEYS_FILE": str(keys_file)}, capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Tenants:
    stack: Stack
    keys_file: Path
    keys: dict[str, str]

    def client(self, who: str | None, url: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.Client(base_url=url or self.stack.url, timeout=30, headers=headers)


@pytest.fixture(scope="module")
def tenants(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    folder = tmp_path_factory.mktemp("tenants")
    keys_file = folder / "keys.toml"
    keys = {"alice": add_key(keys_file, "alice", "--max-queued-jobs", "2"),
            "bob": add_key(keys_file, "bob"),
            "predictor": add_key(keys_file, "predictor", "--scopes", "predict", "--rate-limit", "3"),
            "ops": add_key(keys_file, "ops", "--scopes", "admin")}
    env = {"UNBOX_API_KEYS_FILE": str(keys_file), "UNBOX_CORS_ORIGINS": ORIGIN}
    with running_stack(artifacts, folder, "tenants", workers=1, env=env) as stack:
        yield Tenants(stack, keys_file, keys)


@pytest.fixture(scope="module")
def photo(chelsea: Image.Image) -> bytes:
    return png_of(chelsea.resize((96, 64)))


def submit(client: httpx.Client, image: bytes, method: str = "slow", params: str = LONG,
           **headers: str) -> httpx.Response:
    return client.post("/v1/jobs", files={"image": ("cat.png", image, "image/png")},
                       data={"method": method, "params": params, "model": "tiny"}, headers=headers)


def test_every_v1_route_needs_a_key(tenants: Tenants) -> None:
    schema = httpx.get(tenants.stack.url + "/openapi.json", timeout=10).json()
    routes = [(method, path.replace("{job_id}", "0" * 32).replace("{name}", "x.png"))
              for path, operations in schema["paths"].items() if path.startswith("/v1")
              for method in operations]
    assert len(routes) >= 10
    with tenants.client(None) as anonymous, httpx.Client(base_url=tenants.stack.url, timeout=30, headers={
            "Authorization": "Bearer ubx_000000000000_" + "A" * 43}) as forged:
        for method, path in routes:
            answer = anonymous.request(method.upper(), path)
            assert answer.status_code == 401, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "unauthorized"
            assert answer.headers["www-authenticate"].startswith("Bearer")
            refused = forged.request(method.upper(), path)
            assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["www-authenticate"]
    assert httpx.get(tenants.stack.url + "/healthz").status_code == 200  # probes stay open


def test_a_key_without_the_scope_gets_403(tenants: Tenants, photo: bytes) -> None:
    with tenants.client("predictor") as predictor, tenants.client("alice") as alice, \
            tenants.client("ops") as ops:
        refused = submit(predictor, photo)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope"
        assert 'scope="jobs"' in refused.headers["www-authenticate"]
        assert alice.get("/v1/workers").status_code == 403
        assert alice.get("/metrics").status_code == 403
        answer = alice.post("/v1/explain", files={"image": ("cat.png", photo, "image/png")}, data={"model": "tiny"})
        assert answer.status_code == 200  # alice holds explain
        assert ops.get("/v1/workers").status_code == 200
        assert ops.get("/metrics").status_code == 200
        assert httpx.get(tenants.stack.url + "/metrics").status_code == 401


def test_another_tenants_job_is_a_404_everywhere(tenants: Tenants, photo: bytes) -> None:
    with tenants.client("alice") as alice, tenants.client("bob") as bob:
        job = submit(alice, photo, method="gradcam", params="{}").json()["id"]
        assert wait_for(alice, job, {"succeeded"})["status"] == "succeeded"
        for answer in (bob.get(f"/v1/jobs/{job}"), bob.get(f"/v1/jobs/{job}?pictures=inline"),
                       bob.get(f"/v1/jobs/{job}/result.png"), bob.get(f"/v1/jobs/{job}/files/overlay.png"),
                       bob.delete(f"/v1/jobs/{job}")):
            assert answer.status_code == 404, answer.text
            assert answer.json()["error"]["code"] == "job_not_found"
        # The same answer as for a job that never existed: nothing tells bob it is there.
        assert bob.get(f"/v1/jobs/{job}").json()["error"]["message"] == \
            bob.get(f"/v1/jobs/{'f' * 32}").json()["error"]["message"].replace("f" * 32, job)
        assert alice.get(f"/v1/jobs/{job}/result.png").status_code == 200
        assert job in [j["id"] for j in alice.get("/v1/jobs").json()["jobs"]]
        assert job not in [j["id"] for j in bob.get("/v1/jobs").json()["jobs"]]
        bob_job = submit(bob, photo, method="gradcam", params="{}").json()["id"]
        wait_for(bob, bob_job, {"succeeded"})
        assert [j["id"] for j in bob.get("/v1/jobs").json()["jobs"]] == [bob_job]


def test_another_tenants_study_is_a_404_and_the_cache_is_per_tenant(tenants: Tenants, photo: bytes) -> None:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat.png", photo)
    spec = json.dumps({"models": ["tiny"], "methods": [{"name": "gradcam"}], "analyses": {"regions": {}}})

    def study(client: httpx.Client) -> dict:
        answer = client.post("/v1/studies", files={"archive": ("a.zip", buffer.getvalue(), "application/zip")},
                             data={"spec": spec})
        assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + 60
        while (view := client.get(f"/v1/studies/{answer.json()['id']}").json())["status"] != "succeeded":
            assert time.monotonic() < deadline, view
            time.sleep(0.1)
        return view

    with tenants.client("alice") as alice, tenants.client("bob") as bob:
        first = study(alice)
        sid = first["id"]
        for answer in (bob.get(f"/v1/studies/{sid}"), bob.get(f"/v1/studies/{sid}/items.csv"),
                       bob.get(f"/v1/studies/{sid}/items/0/overlay.png"), bob.delete(f"/v1/studies/{sid}")):
            assert (answer.status_code, answer.json()["error"]["code"]) == (404, "study_not_found"), answer.text
        assert sid not in [s["id"] for s in bob.get("/v1/studies").json()["studies"]]
        assert alice.get(f"/v1/studies/{sid}/items/0/overlay.png").status_code == 200
        assert study(bob)["progress"]["cached"] == 0  # alice's results are hers alone
        assert study(alice)["progress"]["cached"] == 1


def test_listing_is_newest_first_and_paged(tenants: Tenants, photo: bytes) -> None:
    with tenants.client("bob") as bob:
        made = [submit(bob, photo, method="gradcam", params="{}").json()["id"] for _ in range(3)]
        for job in made:
            wait_for(bob, job, {"succeeded"})
        seen, cursor = [], None
        while True:
            page = bob.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            assert len(page["jobs"]) <= 2 and all("result" not in job for job in page["jobs"])
            seen += [job["id"] for job in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen[:3] == made[::-1] and len(seen) == len(set(seen))
        assert bob.get("/v1/jobs", params={"cursor": "not-a-cursor"}).status_code == 422


def test_idempotency_keys_are_per_tenant(tenants: Tenants, photo: bytes, chelsea: Image.Image) -> None:
    other = png_of(chelsea.resize((64, 64)))
    with tenants.client("alice") as alice, tenants.client("bob") as bob:
        first = submit(alice, photo, method="gradcam", params="{}", **{"Idempotency-Key": "order-17"})
        second = submit(bob, other, method="gradcam", params="{}", **{"Idempotency-Key": "order-17"})
        assert first.status_code == second.status_code == 202, second.text
        assert first.json()["id"] != second.json()["id"] and "idempotent-replayed" not in second.headers
        again = submit(alice, photo, method="gradcam", params="{}", **{"Idempotency-Key": "order-17"})
        assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"


def test_queued_jobs_quota_per_key(tenants: Tenants, photo: bytes) -> None:
    with tenants.client("alice") as alice, tenants.client("bob") as bob:
        held = [submit(alice, photo) for _ in range(2)]
        assert [answer.status_code for answer in held] == [202, 202]
        over = submit(alice, photo)
        assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
        assert int(over.headers["retry-after"]) >= 1
        other = submit(bob, photo, method="gradcam", params="{}")
        assert other.status_code == 202  # bob's quota is his own
        assert alice.delete(f"/v1/jobs/{held[1].json()['id']}").status_code in (200, 202)
        wait_for(alice, held[1].json()["id"], {"canceled"})
        replacement = submit(alice, photo)
        assert replacement.status_code == 202, replacement.text
        for job in (held[0].json()["id"], replacement.json()["id"]):
            alice.delete(f"/v1/jobs/{job}")
            wait_for(alice, job, {"canceled"})


def test_rate_limit_is_shared_by_api_processes(tenants: Tenants, photo: bytes) -> None:
    """The predictor key may make 3 requests a minute, counted in Redis: spread over two API
    processes it still gets exactly 3, then 429 with Retry-After and the RateLimit headers."""
    second, url = start_api(tenants.stack.env, tenants.stack.logs / "tenants-api-2.log")
    try:
        with tenants.client("predictor") as one, tenants.client("predictor", url) as two, \
                tenants.client("bob") as bob:
            answers = [(one if i % 2 else two).post("/v1/predict", files={"image": ("c.png", photo, "image/png")},
                                                    data={"model": "tiny"}) for i in range(5)]
            assert [a.status_code for a in answers] == [200, 200, 200, 429, 429], [a.text for a in answers]
            assert answers[0].headers["ratelimit-policy"] == '"per-minute";q=3;w=60'
            assert [a.headers["ratelimit"].split(";")[1] for a in answers[:3]] == ["r=2", "r=1", "r=0"]
            refused = answers[3]
            assert refused.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request per 20 s comes back
            ok = bob.post("/v1/predict", files={"image": ("c.png", photo, "image/png")}, data={"model": "tiny"})
            assert ok.status_code == 200  # another key is not limited by the predictor's use
    finally:
        stop(second)


def test_revoked_key_stops_working(tenants: Tenants) -> None:
    temporary = add_key(tenants.keys_file, "temporary")
    key_id = temporary.split("_")[1]
    with httpx.Client(base_url=tenants.stack.url, headers={"Authorization": f"Bearer {temporary}"}) as client:
        deadline = time.monotonic() + 10
        while client.get("/v1/models").status_code != 200:  # the file is re-read within a second
            assert time.monotonic() < deadline
            time.sleep(0.2)
        subprocess.run([sys.executable, "-m", "app.cli", "keys", "revoke", key_id], cwd=REPO, check=True,
                       env={**os.environ, "UNBOX_API_KEYS_FILE": str(tenants.keys_file)}, capture_output=True)
        deadline = time.monotonic() + 10
        while client.get("/v1/models").status_code != 401:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_cors_preflight_for_the_configured_origin_only(tenants: Tenants) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,idempotency-key"}
    allowed = httpx.options(tenants.stack.url + "/v1/jobs", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    refused = httpx.options(tenants.stack.url + "/v1/jobs", headers={"Origin": "https://evil.example", **preflight})
    assert refused.status_code >= 400 and "access-control-allow-origin" not in refused.headers
    # A browser on the allowed origin can read the 401 (and so knows to ask for a key).
    answer = httpx.get(tenants.stack.url + "/v1/models", headers={"Origin": ORIGIN})
    assert answer.status_code == 401 and answer.headers["access-control-allow-origin"] == ORIGIN


def test_job_ends_are_counted_by_method_and_outcome(tenants: Tenants, photo: bytes) -> None:
    """The scripts that end jobs keep the statistics /metrics reports and the quota sets exact."""
    with tenants.client("bob") as bob:
        failed = submit(bob, photo, method="boom", params="{}").json()["id"]
        wait_for(bob, failed, {"failed"})
        succeeded = submit(bob, photo, method="gradcam", params="{}").json()["id"]
        wait_for(bob, succeeded, {"succeeded"})
    connection = tenants.stack.redis()
    outcomes = {k.decode(): int(v) for k, v in connection.hgetall("unbox:stats:jobs").items()}
    durations = {k.decode(): float(v) for k, v in connection.hgetall("unbox:stats:job_seconds").items()}
    assert outcomes["boom\tfailed"] >= 1 and outcomes["slow\tcanceled"] >= 3
    assert outcomes["gradcam\tsucceeded"] >= 6
    assert durations["gradcam\tcount"] == outcomes["gradcam\tsucceeded"]
    buckets = [v for k, v in durations.items() if k.startswith("gradcam\t") and k.split("\t")[1] not in ("sum", "count")]
    assert sum(buckets) == durations["gradcam\tcount"] and durations["gradcam\tsum"] > 0
    for name in connection.scan_iter("unbox:active:*"):  # every job ended: no quota is held
        assert connection.scard(name) == 0, name
