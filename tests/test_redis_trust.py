"""Trust at the Redis boundary: the embedded Redis lets in only a client with its password, on
loopback only, and a real worker runs nothing but Unbox's own job methods: jobs that some other
tool wrote into the queue (an RQ-style pickled call, a payload naming ``os.system``) are refused
with ``invalid_payload``, logged by id, and never unpickled, imported or executed. One Redis and
one worker (64 px random ResNet-18) serve the whole module."""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from PIL import Image
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.queue_support import TINY_CATALOG, png_of, start_worker
from workers.jobqueue import JobStore, job_key, queue_key
from workers.redis_server import EmbeddedRedis, EmbeddedRedisError
from workers.stored_image import encode_for_storage

REQUEST_ID = "trust-test:req-1"


class _Exploit:
    """Unpickling this runs ``touch MARKER``: a pickled RQ job's ``data`` does that to a worker
    that loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as started:
        yield started


@pytest.fixture(scope="module")
def connection(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def worker(server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Path]]:
    folder = tmp_path_factory.mktemp("trust")
    (folder / "catalog.toml").write_text(TINY_CATALOG)
    log = folder / "worker.log"
    env = {"UNBOX_REDIS_URL": server.url, "UNBOX_CATALOG": str(folder / "catalog.toml"), "UNBOX_MODELS": "tiny",
           "UNBOX_LOG_FORMAT": "json", "UNBOX_WORKER_HEARTBEAT_S": "0.5", "UNBOX_TORCH_THREADS": "1",
           "UNBOX_CPU_RUNTIME": "torch", "UNBOX_FAST_WARMUP": "false"}
    process = start_worker(env, log)
    yield process, log
    process.terminate()
    try:
        process.wait(timeout=20)
    except Exception:
        process.kill()
        process.wait()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


def test_embedded_redis_wants_its_password(server: EmbeddedRedis, connection: redis.Redis) -> None:
    once = {"socket_timeout": 2, "retry": Retry(NoBackoff(), 0)}  # no retries: a refusal is final
    anonymous = redis.Redis(host=server.host, port=server.port, **once)
    with pytest.raises((redis.AuthenticationError, redis.ResponseError), match="(?i)auth"):
        anonymous.ping()
    wrong = redis.Redis(host=server.host, port=server.port, password="not-the-password", **once)
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
        wrong.ping()
    assert connection.ping() is True
    assert len(server.password) >= 40 and server.password in server.url
    assert server.password not in server.display_url and str(server.port) in server.display_url
    assert EmbeddedRedis().password != server.password  # one per server, never a fixed default
    argv = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
    assert server.password.encode() not in argv  # not visible to `ps`
    with pytest.raises(redis.ResponseError, match="unknown command"):
        connection.execute_command("DEBUG", "SLEEP", "0")


def test_embedded_redis_listens_on_loopback_only(server: EmbeddedRedis, connection: redis.Redis) -> None:
    assert connection.config_get("bind") == {"bind": "127.0.0.1"}
    addresses = _listening_addresses(server.port)
    if not addresses:
        pytest.skip("no /proc/net/tcp here")
    assert addresses == {"0100007F"}, addresses  # 127.0.0.1, not 0.0.0.0 or another interface
    with pytest.raises(EmbeddedRedisError, match="loopback"):
        EmbeddedRedis(host="0.0.0.0")


def _craft(connection: redis.Redis, job_id: str, fields: dict[str, object]) -> None:
    """A job record written straight into Unbox's queue, as a tool other than Unbox would."""
    connection.hset(job_key(job_id), mapping={"id": job_id, "status": "queued", **fields})
    connection.lpush(queue_key("unbox"), job_id)
    connection.lpush("unbox:wake:unbox", "1")


def _record(connection: redis.Redis, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode(errors="replace") for k, v in connection.hgetall(job_key(job_id)).items()}


def _wait_ended(connection: redis.Redis, job_ids: list[str], timeout: float = 60.0) -> dict[str, dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        records = {job_id: _record(connection, job_id) for job_id in job_ids}
        if all(r.get("status") in ("succeeded", "failed", "canceled") for r in records.values()):
            return records
        if time.monotonic() > deadline:
            raise AssertionError({job_id: r.get("status") for job_id, r in records.items()})
        time.sleep(0.1)


def test_worker_refuses_jobs_that_are_not_unbox_payloads(worker, connection: redis.Redis, tmp_path: Path,
                                                          chelsea: Image.Image) -> None:
    process, log = worker
    marker = tmp_path / "exploited"
    command = f"touch {marker}"
    pickled = pickle.dumps(("os.system", None, (command,), {}))
    crafted = {
        # RQ's own record: the pickled call in `data`, no Unbox payload at all
        "rq-style": {"data": pickle.dumps(_Exploit(marker)), "func_name": "os.system", "origin": "unbox",
                     "description": f"os.system({command!r})", "timeout": "180"},
        # a pickle where Unbox keeps its JSON payload
        "pickled-payload": {"payload": pickled, "timeout_s": "60", "result_ttl": "60"},
        # JSON naming a function instead of one of Unbox's methods
        "names-os-system": {"payload": json.dumps({"method": "os.system", "model": "tiny",
                                                   "params": {"command": command}}), "timeout_s": "60"},
        "names-os-getpid": {"payload": json.dumps({"method": "os:getpid", "model": "tiny"}), "timeout_s": "60"},
        # a real method, with a callable smuggled beside it (JobPayload forbids extra fields)
        "smuggled-callable": {"payload": json.dumps({"method": "gradcam", "model": "tiny", "func": "os.system",
                                                     "args": [command]}), "timeout_s": "60"},
        "not-an-object": {"payload": json.dumps(["os.system", command]), "timeout_s": "60"},
    }
    for job_id, fields in crafted.items():
        _craft(connection, job_id, fields)
    # then one genuine job, submitted the way the API does, carrying its request's id
    image = chelsea.resize((96, 64))
    store = JobStore(connection, "unbox", 0.5)
    answer = store.enqueue("genuine", {"method": "gradcam", "model": "tiny", "target": None, "params": {},
                                       "callback_url": None, "request_id": REQUEST_ID},
                           encode_for_storage(png_of(image), image, "PNG"), timeout_s=60, pending_ttl_s=300,
                           result_ttl_s=300, max_queue=100)
    assert isinstance(answer, dict), answer

    records = _wait_ended(connection, [*crafted, "genuine"])
    assert records["genuine"]["status"] == "succeeded", records["genuine"]
    for job_id in crafted:
        assert records[job_id]["status"] == "failed", (job_id, records[job_id])
        assert json.loads(records[job_id]["error"])["code"] == "invalid_payload", (job_id, records[job_id])
    assert not marker.exists(), "a crafted job's code ran"
    assert process.poll() is None, "the worker died on a crafted job"

    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    for job_id in crafted:
        refusals = [line for line in lines if line.get("job_id") == job_id and line["level"] == "ERROR"
                    and "refused" in line["message"]]
        assert refusals, f"no refusal of {job_id} in the worker log"
        assert all(command not in json.dumps(line) and "os.system" not in json.dumps(line) for line in refusals)
    genuine = [line for line in lines if line.get("job_id") == "genuine"]
    assert genuine and all(line.get("request_id") == REQUEST_ID for line in genuine), genuine
    assert any("taken" in line["message"] for line in genuine)
    assert not any(line.get("request_id") == REQUEST_ID for line in lines if line.get("job_id") != "genuine")
    # the log never shows the Redis password
    assert connection.connection_pool.connection_kwargs["password"] not in log.read_text()


def test_worker_log_names_redis_without_its_password(worker, server: EmbeddedRedis) -> None:
    _process, log = worker
    text = log.read_text()
    assert f"127.0.0.1:{server.port}" in text and server.password not in text


def test_a_tls_redis_url_reaches_every_client_as_configured() -> None:
    """``rediss://`` with a password and redis-py's TLS options in the query: the workers' and the
    API's clients (queue, health probe, metrics) all get a TLS connection with those options."""
    import redis.asyncio as aioredis

    from app.metrics import QueueCollector
    from app.queue_health import QueueHealth
    from workers.jobqueue import connect
    from core.settings import CoreSettings

    url = ("rediss://:s3cret@redis.example:6380/2?ssl_ca_certs=/etc/unbox/redis-ca.pem"
           "&ssl_cert_reqs=required&ssl_check_hostname=true")
    health = QueueHealth(CoreSettings(redis_url=url)).connection.client()
    pools = [connect(url, 1.0).connection_pool, QueueCollector(url, "unbox", 2.0).client.connection_pool,
             health.connection_pool]
    for pool in pools:
        assert issubclass(pool.connection_class, (redis.SSLConnection, aioredis.SSLConnection)), pool
        options = pool.connection_kwargs
        assert (options["host"], options["port"], options["db"], options["password"]) == (
            "redis.example", 6380, 2, "s3cret")
        assert options["ssl_ca_certs"] == "/etc/unbox/redis-ca.pem" and options["ssl_cert_reqs"] == "required"
        assert options["ssl_check_hostname"] is True
