"""Request ids, structured logs and Prometheus metrics of the API, in process (no model loaded):
X-Request-ID on every response, errors included; one JSON log line per request carrying it;
HTTP series labelled by route template; the queue's numbers read from a real Redis at scrape
time, and skipped when Redis is away."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
import redis
from fastapi import Request
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings
from workers.jobqueue import JobStore, queue_key
from workers.logging_setup import JsonFormatter, TextFormatter, configure_logging, job_id_var, request_id_var
from workers.redis_server import EmbeddedRedis

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


def _client(**settings: object) -> TestClient:
    app = create_app(Settings(models=[], **settings))

    @app.get("/test/echo-id", include_in_schema=False)
    def echo(request: Request) -> dict:
        return {"request_id": request.state.request_id}

    @app.get("/test/crash", include_in_schema=False)
    def crash() -> dict:
        raise RuntimeError("boom")

    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as started:
        yield started


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with _client() as started:
        yield started


class _Lines(logging.Handler):
    """Collects each record as the JSON formatter writes it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def json_lines() -> Iterator[list[dict]]:
    handler, logger = _Lines(), logging.getLogger("unbox")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


# ----- request ids ---------------------------------------------------------------------------
def test_a_plain_request_id_is_kept_and_reaches_the_route(client: TestClient) -> None:
    answer = client.get("/test/echo-id", headers={"X-Request-ID": "lb-7f3a.2024:x_y-Z"})
    assert answer.headers["x-request-id"] == "lb-7f3a.2024:x_y-Z"
    assert answer.json() == {"request_id": "lb-7f3a.2024:x_y-Z"}


@pytest.mark.parametrize("sent", ["has spaces", "a" * 129, "semi;colon", "", "quote\"d", "caf\u00e9"])
def test_an_unacceptable_request_id_is_replaced(client: TestClient, sent: str) -> None:
    answer = client.get("/test/echo-id", headers={"X-Request-ID": sent.encode("utf-8")})
    assert HEX_ID.match(answer.headers["x-request-id"]), answer.headers
    assert answer.json()["request_id"] == answer.headers["x-request-id"]


def test_every_response_carries_a_fresh_id(client: TestClient) -> None:
    first, second = client.get("/healthz"), client.get("/healthz")
    assert HEX_ID.match(first.headers["x-request-id"]) and HEX_ID.match(second.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/no/such/page", 404),          # routing's own 404
    ("GET", "/v1/jobs/abc123", 503),        # an API error (no queue configured)
    ("POST", "/v1/predict", 422),           # a validation error
    ("DELETE", "/healthz", 405),
    ("GET", "/test/crash", 500),            # a crash nothing handled
])
def test_errors_carry_the_request_id(client: TestClient, method: str, path: str, status: int) -> None:
    answer = client.request(method, path, headers={"X-Request-ID": "err-check-1"})
    assert answer.status_code == status, answer.text
    assert answer.headers["x-request-id"] == "err-check-1"
    assert "error" in answer.json()


def test_an_oversized_body_refused_before_routing_carries_it(client: TestClient) -> None:
    too_big = client.app.state.settings.max_upload_bytes + 10 * 1024 * 1024
    answer = client.post("/v1/predict", headers={"X-Request-ID": "big-1", "Content-Length": str(too_big)},
                         content=b"")
    assert answer.status_code == 413 and answer.headers["x-request-id"] == "big-1"


# ----- logs ----------------------------------------------------------------------------------
def test_one_json_line_per_request_with_its_id_and_route(client: TestClient, json_lines: list[dict]) -> None:
    client.get("/v1/jobs/abc123", headers={"X-Request-ID": "log-check-1"})
    client.get("/healthz", headers={"X-Request-ID": "probe-1"})
    client.get("/test/crash", headers={"X-Request-ID": "crash-1"})
    http = [line for line in json_lines if line["logger"] == "unbox.http"]
    job = next(line for line in http if line.get("request_id") == "log-check-1")
    assert job["level"] == "INFO" and job["route"] == "/v1/jobs/{job_id}" and job["status"] == 503
    assert job["http_method"] == "GET" and job["duration_ms"] >= 0 and "abc123" not in json.dumps(job)
    probe = next(line for line in http if line.get("request_id") == "probe-1")
    assert probe["level"] == "DEBUG"  # probes stay out of INFO
    crash = [line for line in json_lines if line.get("request_id") == "crash-1"]
    assert any(line["level"] == "ERROR" and "RuntimeError: boom" in line.get("exc_info", "") for line in crash)
    assert any(line["logger"] == "unbox.http" and line["status"] == 500 for line in crash)


def _record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
    return logging.LogRecord("unbox.test", logging.WARNING, __file__, 1, message, None,
                             (type(exc), exc, exc.__traceback__) if exc else None)


def test_json_lines_carry_the_context_and_mask_redis_passwords() -> None:
    formatter = JsonFormatter()
    try:
        raise ValueError("the cause")
    except ValueError as caught:
        error = caught
    request_token, job_token = request_id_var.set("req-9"), job_id_var.set("job-9")
    try:
        line = json.loads(formatter.format(_record("cannot reach redis://:s3cret-pw@10.0.0.5:6379/0", error)))
    finally:
        request_id_var.reset(request_token)
        job_id_var.reset(job_token)
    assert line["level"] == "WARNING" and line["logger"] == "unbox.test"
    assert line["request_id"] == "req-9" and line["job_id"] == "job-9"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", line["time"])
    assert "ValueError: the cause" in line["exc_info"] and "Traceback" in line["exc_info"]
    assert "s3cret-pw" not in json.dumps(line) and "redis://:***@10.0.0.5:6379/0" in line["message"]
    plain = json.loads(formatter.format(_record("no context")))
    assert "request_id" not in plain and "job_id" not in plain and "exc_info" not in plain
    text = TextFormatter().format(_record("at rediss://user:pw@host:6380/0"))
    assert text.endswith("WARNING unbox.test: at rediss://user:***@host:6380/0")


def test_logging_is_configured_once_per_process() -> None:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        configure_logging("info", "json", stream=stream)
        configure_logging("debug", "json", stream=stream)  # again: same handler, new level
        added = [h for h in root.handlers if h not in before]
        assert len(added) == 1 and root.level == logging.DEBUG
        logging.getLogger("unbox.anything").info("model x loaded")
        assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "model x loaded"
        configure_logging("info", "text", stream=stream)
        logging.getLogger("uvicorn.error").info("Uvicorn running")
        assert stream.getvalue().rstrip().endswith("INFO uvicorn.error: Uvicorn running")
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        root.setLevel(level)


# ----- metrics -------------------------------------------------------------------------------
def _families(client: TestClient) -> dict[str, object]:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(answer.text)}


def _samples(family: object) -> dict[tuple, float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value for sample in family.samples}


def test_http_series_are_labelled_by_route_template(client: TestClient) -> None:
    client.get("/v1/jobs/abc123")
    client.get("/v1/jobs/def456")
    client.get("/no/such/path-xyz")
    text = client.get("/metrics").text
    assert "abc123" not in text and "def456" not in text and "path-xyz" not in text
    requests = _samples(_families(client)["unbox_http_requests"])
    templated = requests[("unbox_http_requests_total", (("http_method", "GET"), ("route", "/v1/jobs/{job_id}"),
                                                        ("status", "503")))]
    assert templated >= 2
    assert requests[("unbox_http_requests_total", (("http_method", "GET"), ("route", "unmatched"),
                                                   ("status", "404")))] >= 1


def test_process_metrics_and_no_queue_metrics_without_redis(client: TestClient) -> None:
    families = _families(client)
    assert "process_resident_memory_bytes" in families and "python_info" in families
    assert "unbox_queue_length" not in families and "unbox_jobs" not in families


def test_queue_metrics_are_skipped_when_redis_is_away() -> None:
    with _client(redis_url="redis://127.0.0.1:1/0") as away:
        families = _families(away)
    assert "process_cpu_seconds" in families and "unbox_queue_length" not in families


def test_queue_metrics_come_from_redis_at_scrape_time(server: EmbeddedRedis) -> None:
    connection = redis.Redis.from_url(server.url)
    try:
        connection.lpush(queue_key("unbox"), "q1", "q2")
        JobStore(connection, "unbox", 2.0).beat_worker("unbox-test-1", {"state": "idle"})
        connection.hset("unbox:stats:jobs", mapping={"gradcam\tsucceeded": 3, "igos++\tfailed": 1,
                                                     "igos++\tsucceeded": 2})
        connection.hset("unbox:stats:job_seconds", mapping={
            "igos++\t5": 2, "igos++\t60": 1, "igos++\t+Inf": 1, "igos++\tsum": 4000.5, "igos++\tcount": 4,
            "gradcam\t1": 3, "gradcam\tsum": 0.75, "gradcam\tcount": 3})
        connection.hset("unbox:stats:webhooks", mapping={"delivered": 5, "given_up": 1})
        with _client(redis_url=server.url) as client:
            families = _families(client)
            assert _samples(families["unbox_queue_length"]) == {("unbox_queue_length", (("queue", "unbox"),)): 2}
            assert _samples(families["unbox_workers_alive"]) == {("unbox_workers_alive", ()): 1}
            assert _samples(families["unbox_jobs"]) == {
                ("unbox_jobs_total", (("method", "gradcam"), ("status", "succeeded"))): 3,
                ("unbox_jobs_total", (("method", "igos++"), ("status", "failed"))): 1,
                ("unbox_jobs_total", (("method", "igos++"), ("status", "succeeded"))): 2}
            durations = families["unbox_job_duration_seconds"]
            assert durations.type == "histogram"
            igos = {s.labels["le"]: s.value for s in durations.samples
                    if s.name.endswith("_bucket") and s.labels["method"] == "igos++"}
            assert igos == {"1.0": 0, "5.0": 2, "15.0": 2, "30.0": 2, "60.0": 3, "120.0": 3, "300.0": 3,
                            "600.0": 3, "1800.0": 3, "3600.0": 3, "+Inf": 4}  # cumulative
            totals = _samples(durations)
            assert totals[("unbox_job_duration_seconds_count", (("method", "igos++"),))] == 4
            assert totals[("unbox_job_duration_seconds_sum", (("method", "igos++"),))] == 4000.5
            assert totals[("unbox_job_duration_seconds_bucket", (("le", "1.0"), ("method", "gradcam")))] == 3
            assert _samples(families["unbox_webhook_deliveries"]) == {
                ("unbox_webhook_deliveries_total", (("outcome", "delivered"),)): 5,
                ("unbox_webhook_deliveries_total", (("outcome", "failed_attempt"),)): 0,
                ("unbox_webhook_deliveries_total", (("outcome", "given_up"),)): 1,
                ("unbox_webhook_deliveries_total", (("outcome", "refused"),)): 0}
            connection.hincrby("unbox:stats:jobs", "gradcam\tsucceeded", 4)  # read live at each scrape
            connection.rpop(queue_key("unbox"))
            again = _families(client)
            assert _samples(again["unbox_jobs"])[
                ("unbox_jobs_total", (("method", "gradcam"), ("status", "succeeded")))] == 7
            assert _samples(again["unbox_queue_length"])[("unbox_queue_length", (("queue", "unbox"),))] == 1
            text = client.get("/metrics").text
            assert server.password not in text and "127.0.0.1" not in text
            ready = client.get("/readyz").text
            assert server.password not in ready and "127.0.0.1" not in ready and "redis://" not in ready
    finally:
        connection.close()
