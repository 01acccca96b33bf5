"""Safe, signed webhooks. The callback guard refuses server-side request forgery in every
spelling; deliveries are signed so that the ``standardwebhooks`` library verifies them, go to
the very address that was checked (checked again at delivery: DNS rebinding), never follow a
redirect, back off by doubling, give up after UNBOX_WEBHOOK_MAX_ATTEMPTS and count their
outcomes in Redis. The sender's tests use a Redis of their own and real local HTTP receivers;
one small real stack (Redis, one worker, the API) carries the job-end events: failed, canceled
by the API while queued (exactly once), and the reaper's worker_lost."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.queue_support import (TERMINAL, WEBHOOK_SECRET, Stack, WebhookReceiver, png_of, running_stack, submit,
                                 submitted, wait_for)
from workers.callback_guard import CallbackGuard, CallbackRefused
from workers.jobqueue import ENDED, JobStore
from workers.redis_server import EmbeddedRedis
from core.settings import CoreSettings, SettingsError, load_core_settings
from workers.webhooks import PENDING, STATS, WebhookSender, _record_key, schedule, schedule_job_end

PUBLIC = "93.184.216.34"
LOOPBACK = [ip_network("127.0.0.1/32")]


def resolver(names: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    """A DNS stand-in: ``names`` resolve to their addresses, any other name does not resolve."""
    def resolve(host: str, _port: int) -> list[str]:
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return names[host]
    return resolve


def poll(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return value


def counters(connection: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in connection.hgetall(STATS).items()}


# ----- the guard ----------------------------------------------------------------------------------
REFUSED = [  # every spelling of a non-public destination, and what the refusal names
    ("http://127.0.0.1/hook", "loopback"),
    ("http://2130706433/hook", "loopback"),  # decimal
    ("http://0x7f000001/hook", "loopback"),  # hex
    ("http://0177.0.0.1/hook", "loopback"),  # octal
    ("http://127.1/hook", "loopback"),  # short form
    ("http://0x7f.1/hook", "loopback"),
    ("http://127.0.0.1./hook", "loopback"),  # the root label
    ("http://\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11/hook", "loopback"),  # full-width digits
    ("http://[::1]:8080/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),  # IPv4-mapped
    ("http://[::ffff:7f00:1]/hook", "loopback"),
    ("http://[64:ff9b::7f00:1]/hook", "leading to 127.0.0.1, a loopback"),  # NAT64
    ("http://[2002:7f00:1::]/hook", "leading to 127.0.0.1, a loopback"),  # 6to4
    ("http://10.0.0.1/hook", "private"),
    ("http://172.16.5.4/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("http://167772161/hook", "private"),  # 10.0.0.1 in decimal
    ("http://[::ffff:10.0.0.1]/hook", "private"),
    ("http://[fc00::1]/hook", "private"),
    ("http://[fd12:3456::1]/hook", "private"),
    ("http://169.254.10.1/hook", "link-local"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://224.0.0.1/hook", "multicast"),
    ("http://[ff02::1]/hook", "multicast"),
    ("http://0.0.0.0/hook", "unspecified"),
    ("http://0/hook", "unspecified"),
    ("http://[::]/hook", "unspecified"),
    ("http://255.255.255.255/hook", "broadcast"),
    ("http://240.0.0.1/hook", "special-purpose"),
    ("http://100.64.0.1/hook", "shared"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://2852039166/latest/meta-data/", "metadata"),  # 169.254.169.254 in decimal
    ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
    ("http://[::ffff:a9fe:a9fe]/", "metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata name"),
    ("http://metadata/computeMetadata/v1/", "metadata name"),
    ("http://localhost:8000/hook", "loopback name"),
    ("http://api.localhost/hook", "loopback name"),
    ("http://inside.test/hook", "resolves to 10.1.2.3, a private"),
    ("http://split.test/hook", "resolves to 127.0.0.1, a loopback"),  # one bad address of two is enough
    ("http://no-such-host.test/hook", "does not resolve"),
    ("http://1.2.3.4.5/hook", "not one"),
    ("http://user:secret@public.test/hook", "user name or password"),
    ("http://@public.test/hook", "user name or password"),
    ("http://public.test:99999/hook", "port"),
    ("http://public.test:0/hook", "port"),
    ("http://public.test:-1/hook", "port"),
    ("ftp://public.test/hook", "http"),
    ("file:///etc/passwd", "http"),
    ("gopher://public.test:6379/_INFO", "http"),
    ("//public.test/hook", "http"),
    ("http:///hook", "http"),
    ("http://[::1/hook", "not a valid URL"),
    ("http://public.test/hook\r\nX-Injected: 1", "control characters"),
    ("http://public.test\\@127.0.0.1/hook", "backslashes"),
    ("http://public.test/" + "a" * 2048, "longer than 2048"),
]
NAMES = {"public.test": [PUBLIC], "inside.test": ["10.1.2.3"], "split.test": [PUBLIC, "127.0.0.1"]}


@pytest.mark.parametrize("url, why", REFUSED, ids=[url[:48] for url, _ in REFUSED])
def test_guard_refuses_every_ssrf_spelling(url: str, why: str) -> None:
    guard = CallbackGuard(resolver=resolver(NAMES))
    with pytest.raises(CallbackRefused) as refused:
        guard.check(url)
    assert why in str(refused.value), str(refused.value)
    assert guard.problem(url) == str(refused.value)


def test_guard_allows_public_destinations_and_keeps_what_to_connect_to() -> None:
    guard = CallbackGuard(resolver=resolver({**NAMES, "dual.test": [PUBLIC, "2606:4700::1111", PUBLIC]}))
    hook = guard.check("https://Public.test:8443/hooks/unbox?tenant=7#frag")
    assert (hook.scheme, hook.host, hook.port, hook.target) == ("https", "public.test", 8443, "/hooks/unbox?tenant=7")
    assert [str(a) for a in hook.addresses] == [PUBLIC]
    assert [str(a) for a in guard.check("http://dual.test").addresses] == [PUBLIC, "2606:4700::1111"]
    assert guard.check("http://dual.test").target == "/"
    assert guard.check("http://public.test/caf\u00e9").target == "/caf%C3%A9"
    for url in (f"http://{PUBLIC}/", "http://[2606:4700::1111]/", f"http://[::ffff:{PUBLIC}]/",
                "http://[64:ff9b::5db8:d822]/"):  # NAT64 of the public address
        assert guard.problem(url) is None, url
    assert [str(a) for a in guard.check(f"http://[::ffff:{PUBLIC}]/").addresses] == [PUBLIC]  # mapped = the IPv4


def test_guard_uses_the_system_resolver_by_default() -> None:
    problem = CallbackGuard().problem("http://no-such-host.invalid/hook")  # .invalid never resolves (RFC 6761)
    assert problem is not None and "does not resolve" in problem


def test_allow_networks_let_on_premise_receivers_in_but_not_metadata() -> None:
    settings = CoreSettings(webhook_allow_networks="127.0.0.1/32, 10.20.0.0/16,fd00:1::/64,169.254.0.0/16")
    assert [str(n) for n in settings.webhook_allow_networks] == ["127.0.0.1/32", "10.20.0.0/16", "fd00:1::/64",
                                                                 "169.254.0.0/16"]
    guard = CallbackGuard(settings.webhook_allow_networks, resolver=resolver({"hooks.corp.test": ["10.20.3.4"]}))
    for url in ("http://127.0.0.1:9000/hook", "http://2130706433:9000/hook", "http://[::ffff:127.0.0.1]/hook",
                "http://10.20.255.1/hook", "http://hooks.corp.test/hook", "http://[fd00:1::5]/hook",
                "http://169.254.10.1/hook"):
        assert guard.problem(url) is None, url
    for url, why in (("http://127.0.0.2/hook", "loopback"), ("http://10.21.0.1/hook", "private"),
                     ("http://[::1]/hook", "loopback"), ("http://[fd00:2::5]/hook", "private"),
                     ("http://169.254.169.254/", "metadata"), ("http://metadata.google.internal/", "metadata")):
        problem = guard.problem(url)
        assert problem is not None and why in problem, (url, problem)
    assert "UNBOX_WEBHOOK_ALLOW_NETWORKS" in CallbackGuard().problem("http://10.0.0.1/")  # says how to allow it
    assert CoreSettings().webhook_allow_networks == []
    for bad in ("10.20.1.0/16", "10.0.0.0/33", "not-a-network"):
        with pytest.raises(SettingsError) as error:
            load_core_settings(webhook_allow_networks=f"127.0.0.1/32,{bad}")
        assert "UNBOX_WEBHOOK_ALLOW_NETWORKS" in str(error.value) and repr(bad) in str(error.value)


def test_webhook_secret_must_be_a_standard_webhooks_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    key = bytes(range(32))
    padded = "whsec_" + base64.b64encode(key).decode()
    assert padded.endswith("=")
    for secret in (padded, padded.rstrip("="), WEBHOOK_SECRET):
        assert CoreSettings(webhook_secret=secret).webhook_secret.get_secret_value() == secret
    assert CoreSettings(webhook_secret="").webhook_secret is None
    too_short = "whsec_" + base64.b64encode(b"k" * 23).decode()
    too_long = "whsec_" + base64.b64encode(b"k" * 65).decode()
    for secret in ("correct horse battery staple", "whsec_not base64!", too_short, too_long):
        monkeypatch.setenv("UNBOX_WEBHOOK_SECRET", secret)
        with pytest.raises(SettingsError) as error:
            load_core_settings()
        message = str(error.value)
        assert "UNBOX_WEBHOOK_SECRET" in message and "whsec_" in message
        assert "base64.b64encode(os.urandom(32))" in message  # how to make a good one
        assert secret not in message  # never shown, even when wrong


# ----- delivery (a Redis of their own, real local receivers) ----------------------------------------
@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.close()


@pytest.fixture
def connection(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., WebhookReceiver]]:
    started: list[WebhookReceiver] = []

    def start(**options: Any) -> WebhookReceiver:
        started.append(WebhookReceiver(**options))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


def sender(connection: redis.Redis, guard: CallbackGuard, max_attempts: int = 3, backoff_s: float = 100.0,
           secret: str = WEBHOOK_SECRET, **options: Any) -> WebhookSender:
    return WebhookSender(connection, secret, max_attempts, backoff_s, timeout_s=5.0, guard=guard, **options)


EVENT = {"type": "job.succeeded", "timestamp": "2025-01-01T00:00:00Z", "data": {"id": "j1", "status": "succeeded"}}


def test_delivery_is_signed_for_standardwebhooks_and_goes_to_the_checked_address(
        connection: redis.Redis, receivers: Callable[..., WebhookReceiver]) -> None:
    """The receiver's name resolves (in the guard) to 127.0.0.1 only; nothing else could resolve it,
    so its delivery proves the sender connects to the checked address and sends the name as Host."""
    import base64

    unpadded = ("whsec_" + base64.b64encode(bytes(range(40, 72))).decode()).rstrip("=")
    receiver = receivers(host_name="hooks.example.test")
    guard = CallbackGuard(LOOPBACK, resolver=resolver({"hooks.example.test": ["127.0.0.1"]}))
    message_id = schedule(connection, receiver.url + "?tenant=7", EVENT)
    assert sender(connection, guard, secret=unpadded).deliver_due() == 1
    (headers, body, status), = receiver.received
    assert status == 204 and headers["webhook-id"] == message_id
    assert headers["host"] == f"hooks.example.test:{receiver.port}" and headers[":path"] == "/hook?tenant=7"
    assert Webhook(unpadded).verify(body, headers) == EVENT
    assert headers["webhook-signature"].startswith("v1,") and headers["content-type"] == "application/json"
    for wrong_body, wrong_secret in ((body + b" ", unpadded), (body, WEBHOOK_SECRET)):
        with pytest.raises(WebhookVerificationError):
            Webhook(wrong_secret).verify(wrong_body, headers)
    assert counters(connection) == {"delivered": 1}
    assert connection.zcard(PENDING) == 0 and not connection.exists(_record_key(message_id))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=hooks.example.test",
                    "-addext", "subjectAltName=DNS:hooks.example.test",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
                   check=True, capture_output=True)
    return folder / "cert.pem", folder / "key.pem"


def test_https_delivery_checks_the_certificate_of_the_url_host(
        connection: redis.Redis, receivers: Callable[..., WebhookReceiver], certificate: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    """Pinned to 127.0.0.1, TLS still uses the URL's name for SNI and the certificate check:
    the certificate's own name is accepted, another name that resolves to the same address is not."""
    cert, key = certificate
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    receiver = receivers(tls=server_tls, host_name="hooks.example.test")
    guard = CallbackGuard(LOOPBACK, resolver=resolver({"hooks.example.test": ["127.0.0.1"],
                                                       "other.example.test": ["127.0.0.1"]}))
    webhooks = sender(connection, guard, max_attempts=1, tls=ssl.create_default_context(cafile=str(cert)))
    schedule(connection, receiver.url, EVENT)
    webhooks.deliver_due()
    assert [status for _, _, status in receiver.received] == [204]
    assert Webhook(WEBHOOK_SECRET).verify(receiver.received[0][1], receiver.received[0][0]) == EVENT
    with caplog.at_level(logging.ERROR, logger="unbox.webhooks"):
        schedule(connection, f"https://other.example.test:{receiver.port}/hook", EVENT)
        webhooks.deliver_due()
    assert len(receiver.received) == 1 and counters(connection) == {"delivered": 1, "given_up": 1}
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text or "certificate" in caplog.text.lower(), caplog.text


def test_a_redirect_is_a_failed_attempt_and_is_not_followed(
        connection: redis.Redis, receivers: Callable[..., WebhookReceiver], caplog: pytest.LogCaptureFixture) -> None:
    target = receivers()
    redirecting = receivers(redirect_to=target.url)
    webhooks = sender(connection, CallbackGuard(LOOPBACK), max_attempts=2)
    message_id = schedule(connection, redirecting.url, EVENT)
    with caplog.at_level(logging.WARNING, logger="unbox.webhooks"):
        webhooks.deliver_due()
    assert [status for _, _, status in redirecting.received] == [302]
    assert "HTTP 302 redirect" in caplog.text and "not followed" in caplog.text
    record = json.loads(connection.get(_record_key(message_id)))
    assert record["attempts"] == 1 and connection.zscore(PENDING, message_id) > time.time() + 50  # retried later
    connection.zadd(PENDING, {message_id: 0})  # due now
    webhooks.deliver_due()
    assert len(redirecting.received) == 2 and target.received == []
    assert counters(connection) == {"failed_attempt": 1, "given_up": 1}


def test_backoff_doubles_per_attempt_up_to_the_cap(connection: redis.Redis,
                                                   receivers: Callable[..., WebhookReceiver]) -> None:
    """The due times stored in Redis after each failed attempt (made due at once by the test):
    150 s, 300 s, then the 600 s cap; the sixth attempt is the last."""
    failing = receivers(fail_first=10**6)
    webhooks = sender(connection, CallbackGuard(LOOPBACK), max_attempts=6, backoff_s=150.0)
    message_id = schedule(connection, failing.url, EVENT)
    gaps = []
    for attempt in range(1, 6):
        before = time.time()
        assert webhooks.deliver_due() == 1
        after = time.time()
        due = connection.zscore(PENDING, message_id)
        gaps.append((due - after, due - before))  # the delay lies between these two
        assert json.loads(connection.get(_record_key(message_id)))["attempts"] == attempt
        connection.zadd(PENDING, {message_id: 0})
    for (low, high), expected in zip(gaps, (150, 300, 600, 600, 600)):
        assert low <= expected <= high, gaps
    webhooks.deliver_due()
    assert len(failing.received) == 6 and connection.zcard(PENDING) == 0
    assert counters(connection) == {"failed_attempt": 5, "given_up": 1}
    assert len({headers["webhook-id"] for headers, _, _ in failing.received}) == 1  # one event, one id


def test_gives_up_after_exactly_max_attempts(connection: redis.Redis,
                                             receivers: Callable[..., WebhookReceiver]) -> None:
    failing = receivers(fail_first=10**6)
    webhooks = WebhookSender(connection, WEBHOOK_SECRET, max_attempts=3, backoff_s=0.05, timeout_s=5.0,
                             poll_s=0.02, guard=CallbackGuard(LOOPBACK))
    message_id = schedule(connection, failing.url, EVENT)
    webhooks.start()
    try:
        poll(lambda: counters(connection).get("given_up"))
    finally:
        webhooks.stop()
    assert counters(connection) == {"failed_attempt": 2, "given_up": 1}
    assert [status for _, _, status in failing.received] == [500, 500, 500]
    assert connection.zcard(PENDING) == 0 and not connection.exists(_record_key(message_id))
    assert webhooks.deliver_due() == 0 and len(failing.received) == 3  # nothing left to send


def test_destination_refused_at_delivery_is_given_up_at_once(
        connection: redis.Redis, receivers: Callable[..., WebhookReceiver], caplog: pytest.LogCaptureFixture) -> None:
    """DNS rebinding: the name was public when the API checked it and is loopback at delivery.
    The delivery is refused without a connection, not retried, logged and counted."""
    receiver = receivers(host_name="rebind.test")
    answers = iter([[PUBLIC], ["127.0.0.1"]])
    guard = CallbackGuard(resolver=lambda host, port: next(answers))
    assert guard.problem(receiver.url) is None  # what the API saw
    message_id = schedule(connection, receiver.url, EVENT)
    private = schedule(connection, "http://10.9.8.7/hook", EVENT)  # stored by whoever can write to Redis
    with caplog.at_level(logging.ERROR, logger="unbox.webhooks"):
        assert sender(connection, guard, max_attempts=5).deliver_due() == 2
    assert receiver.received == []
    assert counters(connection) == {"refused": 2}
    assert connection.zcard(PENDING) == 0
    assert not connection.exists(_record_key(message_id)) and not connection.exists(_record_key(private))
    assert caplog.text.count("refused at delivery") == 2 and "127.0.0.1, a loopback address" in caplog.text


def test_a_sender_without_a_secret_leaves_deliveries_for_one_that_has_it(connection: redis.Redis) -> None:
    schedule(connection, "http://127.0.0.1:9/hook", EVENT)
    unsigned = WebhookSender(connection, None, 3, 1.0, 5.0, guard=CallbackGuard(LOOPBACK))
    assert unsigned.deliver_due() == 0 and connection.zcard(PENDING) == 1 and counters(connection) == {}


def test_webhooks_not_configured_is_a_422() -> None:
    """No UNBOX_WEBHOOK_SECRET: a job that asks for a callback is refused before it is queued."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(webhook_secret=None, redis_url=None, models=[]))
    image = png_of(Image.new("RGB", (32, 32)))
    with TestClient(app) as client:
        for url in ("https://hooks.example.com/unbox", "http://127.0.0.1/hook"):
            response = client.post("/v1/jobs", files={"image": ("x.png", image, "image/png")},
                                   data={"method": "gradcam", "callback_url": url})
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "webhooks_not_configured"


# ----- one real stack: the API's 422s and the job-end events ---------------------------------------
@pytest.fixture(scope="module")
def stack(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(artifacts, tmp_path_factory.mktemp("webhooks"), "webhooks", workers=1,
                       env={"UNBOX_RATE_LIMIT_PER_MINUTE": "0", "UNBOX_FAST_WARMUP": "false"}) as started:
        yield started


@pytest.fixture(scope="module")
def tiny_png() -> bytes:
    return png_of(Image.new("RGB", (48, 32), (200, 120, 40)))


def test_the_api_refuses_ssrf_callbacks_with_422(stack: Stack, tiny_png: bytes) -> None:
    """The stack allows 127.0.0.1/32 for its receivers; everything else non-public is a 422."""
    refused = ["http://2130706434/hook", "http://0x7f000002/hook", "http://0177.0.0.2/hook", "http://127.2/hook",
               "http://[::1]:8080/hook", "http://[::ffff:7f00:2]/hook", "http://[::ffff:10.0.0.1]/hook",
               "http://169.254.169.254/latest/meta-data/", "http://metadata.google.internal/",
               "http://user:pass@127.0.0.1:8080/hook", "http://127.0.0.1:99999/hook", "gopher://127.0.0.1/",
               "http://no-such-host.invalid/hook", "http://localhost:8000/hook", "http://x/" + "a" * 2048]
    with stack.client() as client:
        for url in refused:
            response = submit(client, tiny_png, "gradcam", model="tiny", callback_url=url)
            assert response.status_code == 422, (url, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_callback_url" and error["message"].startswith("callback_url"), url
    assert stack.redis().zcard(PENDING) == 0


def _event(receiver: WebhookReceiver, job_id: str) -> list[tuple[dict[str, str], bytes]]:
    return [(headers, body) for headers, body, status in receiver.received
            if status == 204 and json.loads(body)["data"]["id"] == job_id]


def test_failed_and_api_canceled_jobs_send_one_verified_event_each(stack: Stack, tiny_png: bytes) -> None:
    receiver = WebhookReceiver()
    connection = stack.redis()
    try:
        with stack.client() as client:
            failing = submitted(client, tiny_png, "boom", model="tiny", callback_url=receiver.url)
            assert wait_for(client, failing, TERMINAL, interval=0.2)["status"] == "failed"
            blocker = submitted(client, tiny_png, "slow", model="tiny", params='{"steps": 10000, "step_s": 0.05}')
            wait_for(client, blocker, {"running"}, interval=0.2)
            queued = submitted(client, tiny_png, "gradcam", model="tiny", callback_url=receiver.url)
            canceled = client.delete(f"/v1/jobs/{queued}")
            assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
            assert client.delete(f"/v1/jobs/{blocker}").status_code == 202
            wait_for(client, blocker, TERMINAL, interval=0.2)
        poll(lambda: _event(receiver, failing) and _event(receiver, queued))
        # The end is announced again (as by a second process seeing it): still one delivery each.
        assert not schedule_job_end(JobStore(connection, "unbox", 0.5), queued)
        connection.sadd(ENDED, queued, failing)
        poll(lambda: not connection.scard(ENDED) and not connection.zcard(PENDING))
        for job_id, kind, code in ((failing, "job.failed", "job_failed"), (queued, "job.canceled", "canceled")):
            (headers, body), = _event(receiver, job_id)
            event = Webhook(WEBHOOK_SECRET).verify(body, headers)
            assert event["type"] == kind and event["data"]["status"] == kind[4:], event
            assert event["data"]["error"]["code"] == code and event["data"]["links"]["self"] == f"/v1/jobs/{job_id}"
        assert json.loads(_event(receiver, queued)[0][1])["data"]["attempts"] == 0  # it never ran
        assert len(receiver.received) == 2  # the blocker asked for no callback
        assert counters(connection).get("delivered", 0) >= 2
    finally:
        receiver.close()


def test_worker_lost_sends_job_failed(stack: Stack) -> None:
    """A job whose worker is lost twice (two takes by workers that never beat, on a queue of its
    own): the stack's reaper retries it once, then fails it with worker_lost, and the end event
    goes out as job.failed."""
    receiver = WebhookReceiver()
    connection = stack.redis()
    store = JobStore(connection, "ghosts", 0.5)
    job_id = uuid.uuid4().hex
    payload = {"method": "gradcam", "model": "tiny", "target": None, "params": {}, "callback_url": receiver.url}
    try:
        assert isinstance(store.enqueue(job_id, payload, b"pixels", timeout_s=60, pending_ttl_s=600,
                                        result_ttl_s=600, max_queue=10), dict)
        for ghost in ("ghost-1", "ghost-2"):
            poll(lambda: store.fields(job_id)["status"] == "queued")
            lease = store.take(ghost, queues=["ghosts"])
            assert lease is not None and lease.job_id == job_id
        poll(lambda: _event(receiver, job_id))
        (headers, body), = _event(receiver, job_id)
        event = Webhook(WEBHOOK_SECRET).verify(body, headers)
        assert event["type"] == "job.failed" and event["data"]["error"]["code"] == "worker_lost", event
        assert event["data"]["attempts"] == 2
    finally:
        receiver.close()
