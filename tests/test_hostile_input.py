"""Hostile input gets a 4xx, never a hang or a 500: bounded JSON, stalled and crowded uploads,
Score-CAM's synchronous cost cap, and /healthz and /readyz answering while inference is busy. Real
``unbox api`` processes, raw sockets where a client has to misbehave."""

from __future__ import annotations

import json
import socket
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.errors import ApiError
from app.json_input import parse_json_object
from tests.conftest import jpeg_bytes, start_api, stop

READ_TIMEOUT_S = 1
BOUNDARY = "unboxboundary"


def parse(text: str | None, max_bytes: int = 4096, max_depth: int = 8) -> dict:
    return parse_json_object(text, field="params", max_bytes=max_bytes, max_depth=max_depth)


def refusal(text: str, **limits: int) -> str:
    """The message of the 422 that ``text`` gets (fails when it is accepted)."""
    with pytest.raises(ApiError) as caught:
        parse(text, **limits)
    assert (caught.value.status, caught.value.code) == (422, "invalid_parameter")
    return caught.value.message


# ----- bounded JSON ------------------------------------------------------------------------------

def test_blank_params_are_an_empty_object():
    assert parse(None) == {} and parse("") == {} and parse("  \n") == {}


def test_deep_nesting_is_refused_before_decoding():
    deep = '{"a":' + "[" * 5000 + "]" * 5000 + "}"
    message = refusal(deep, max_bytes=64 * 1024, max_depth=32)
    assert "params" in message and "32" in message


def test_depth_limit_is_exact():
    assert parse('{"a": [[[1]]]}', max_depth=4) == {"a": [[[1]]]}
    assert "4" in refusal('{"a": [[[[1]]]]}', max_depth=4)


def test_brackets_inside_strings_do_not_count():
    assert parse('{"a": "[[[[{{{{"}', max_depth=2) == {"a": "[[[[{{{{"}
    escaped = r'{"a": "\"[[", "b": "\\", "c": ["[[\\\"[["]}'
    assert parse(escaped, max_depth=2) == {"a": '"[[', "b": "\\", "c": ['[[\\"[[']}


def test_valid_nested_object_within_the_limits_passes():
    value = {"steps": 10, "preset": "cpu", "nested": {"list": [1, 2, {"x": [True, None]}]}}
    assert parse(json.dumps(value)) == value


def test_size_is_counted_in_utf8_bytes():
    text = json.dumps({"a": "é" * 300}, ensure_ascii=False)  # 300 characters, 600 bytes
    assert len(text) < 400 < len(text.encode())
    assert "400 bytes" in refusal(text, max_bytes=400)
    assert parse(text, max_bytes=700)["a"] == "é" * 300


@pytest.mark.parametrize("text", ["[1, 2]", '"text"', "3", "null", "true"])
def test_top_level_must_be_an_object(text):
    assert "JSON object" in refusal(text)


@pytest.mark.parametrize("text", ["{not json", '{"a": 1', '{"a": NaN}', '{"a": ' + "9" * 5000 + "}", "]]]]"])
def test_invalid_json_is_refused(text):
    refusal(text, max_bytes=64 * 1024)


# ----- the servers -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(artifacts: Path, resnet_catalog: Path) -> Iterator[str]:
    """The default model, a one-second body read timeout, one inference at a time."""
    process, url = start_api({"UNBOX_UPLOAD_READ_TIMEOUT_S": str(READ_TIMEOUT_S), "UNBOX_CATALOG": str(resnet_catalog),
                              "UNBOX_MAX_CONCURRENT_INFERENCE": "1", "UNBOX_CPU_RUNTIME": "torch",
                              "UNBOX_FAST_WARMUP": "false"}, artifacts / "hostile-api.log")  # bodies under test
    yield url
    stop(process)


@pytest.fixture(scope="module")
def crowded_api(artifacts: Path) -> Iterator[str]:
    """No models (uploads are refused before any inference) and room for two uploads at once."""
    process, url = start_api({"UNBOX_MODELS": "", "UNBOX_MAX_CONCURRENT_UPLOADS": "2",
                              "UNBOX_UPLOAD_READ_TIMEOUT_S": "3"}, artifacts / "hostile-crowded-api.log")
    yield url
    stop(process)


def stalled_upload(url: str, declared: int = 100_000, sent: int = 10) -> socket.socket:
    """A raw connection that announces a ``declared``-byte multipart body and sends ``sent`` bytes of it."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {declared}\r\n\r\n")
    sock.sendall(head.encode() + f"--{BOUNDARY}\r\n".encode()[:sent].ljust(sent, b"x"))
    return sock


def read_to_close(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection (True) or ``timeout`` passes (False)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
        return data, True
    except TimeoutError:
        return data, False
    finally:
        sock.close()


def error_of(raw: bytes) -> tuple[int, dict[str, str], dict]:
    """Status, lower-cased headers and JSON body of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


# ----- stalled and crowded uploads ---------------------------------------------------------------

def test_a_stalled_body_gets_408_and_the_socket_is_closed(api):
    started = time.monotonic()
    raw, closed = read_to_close(stalled_upload(api), timeout=READ_TIMEOUT_S + 5)
    elapsed = time.monotonic() - started
    status, headers, body = error_of(raw)
    assert (status, body["error"]["code"]) == (408, "upload_timeout"), raw
    assert headers["connection"] == "close" and closed
    assert READ_TIMEOUT_S <= elapsed < READ_TIMEOUT_S + 4
    print(f"stalled upload answered 408 and closed after {elapsed:.2f} s")


def test_fifty_stalled_bodies_are_all_answered_and_closed(api, chelsea):
    sockets = [stalled_upload(api) for _ in range(50)]
    answers = [read_to_close(sock, timeout=READ_TIMEOUT_S + 8) for sock in sockets]
    assert all(closed for _, closed in answers)
    assert {error_of(raw)[0] for raw, _ in answers} == {408}
    response = httpx.post(api + "/v1/predict", files={"image": ("cat.jpg", jpeg_bytes(chelsea), "image/jpeg")},
                          timeout=60)
    assert response.status_code == 200, response.text


def test_beyond_the_upload_cap_a_request_gets_503_unread(crowded_api):
    held = [stalled_upload(crowded_api) for _ in range(2)]
    time.sleep(0.5)  # let the server take both before the third arrives
    raw, closed = read_to_close(stalled_upload(crowded_api), timeout=2)
    status, headers, body = error_of(raw)
    assert (status, body["error"]["code"]) == (503, "too_many_uploads"), raw
    assert headers["retry-after"] == "1" and closed
    assert "UNBOX_MAX_CONCURRENT_UPLOADS" in body["error"]["message"]
    assert {error_of(read_to_close(sock, timeout=8)[0])[0] for sock in held} == {408}
    freed = httpx.post(crowded_api + "/v1/predict", files={"image": ("x.jpg", b"not an image", "image/jpeg")},
                       timeout=30)
    assert freed.status_code == 415, freed.text  # the slots are free again: read, then refused


def test_requests_without_a_body_are_not_counted(crowded_api):
    held = [stalled_upload(crowded_api) for _ in range(2)]
    time.sleep(0.5)
    assert httpx.get(crowded_api + "/healthz", timeout=5).status_code == 200
    for sock in held:
        sock.close()


# ----- Score-CAM's synchronous cost cap ----------------------------------------------------------

def explain(url: str, image: bytes, **form: object) -> httpx.Response:
    return httpx.post(url + "/v1/explain", files={"image": ("image.jpg", image, "image/jpeg")},
                      data={key: str(value) for key, value in form.items()}, timeout=120)


@pytest.mark.parametrize("form", [
    {"channels": 100000},
    {"channels": "all"},  # bn2 of efficientnet_lite0: 1280 channels
    {"channels": "all", "model": "resnet18_random", "layer": "layer4"},  # a block: its width is probed
])
def test_too_many_synchronous_scorecam_channels_are_422(api, chelsea, form):
    response = explain(api, jpeg_bytes(chelsea.resize((96, 64))), method="scorecam", **form)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "too_costly"
    assert "256" in error["message"] and "UNBOX_SYNC_SCORECAM_MAX_CHANNELS" in error["message"]
    assert "POST /v1/jobs" in error["message"] and "scorecam" in error["message"]


def test_scorecam_under_the_cap_still_answers(api, chelsea):
    response = explain(api, jpeg_bytes(chelsea.resize((96, 64))), method="scorecam", channels=64)
    assert response.status_code == 200, response.text
    assert response.json()["details"]["channels"] == 64


def test_exact_scorecam_is_allowed_on_layers_within_the_cap(resnet_catalog):
    """The layer's width comes from the module (a convolution) or from one probe forward (a block)."""
    from app.metrics import Metrics
    from app.service import InferenceService
    from app.settings import load_settings
    from models import ModelRegistry, load_catalog

    registry = ModelRegistry(load_catalog(resnet_catalog), "cpu")
    service = InferenceService(load_settings(models=[]), registry, Metrics())
    resnet = registry.get("resnet18_random")
    assert service.layer_channels(resnet, "layer1") == 64 and service.layer_channels(resnet, "layer4") == 512
    assert service.layer_channels(resnet, "layer3.1.conv2") == 256
    assert service.method_config("scorecam", "all", resnet, "layer3").channels is None
    with pytest.raises(ApiError) as caught:
        service.method_config("scorecam", "all", resnet, "layer4")
    assert caught.value.code == "too_costly"
    with pytest.raises(ApiError) as caught:
        service.layer_channels(resnet, "fc")  # no feature map: the explainer's own 422
    assert caught.value.code == "layer_unsupported"


# ----- health under load -------------------------------------------------------------------------

def test_health_probes_answer_while_inference_is_busy(api, coffee):
    image = jpeg_bytes(coffee)  # 600 x 400

    def one(_: int) -> int:
        return explain(api, image, method="gradcam").status_code

    with ThreadPoolExecutor(max_workers=24) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        time.sleep(0.3)  # the explains are queued on the server
        latencies, statuses = [], []
        with httpx.Client(base_url=api, timeout=10) as client:
            for probe in ("/healthz", "/readyz") * 10:
                began = time.perf_counter()
                statuses.append(client.get(probe).status_code)
                latencies.append(time.perf_counter() - began)
                time.sleep(0.02)
        in_flight = sum(not future.done() for future in futures)
        results = [future.result() for future in futures]
    median, worst = statistics.median(latencies), max(latencies)
    print(f"/healthz and /readyz under load: median {median * 1e3:.1f} ms, max {worst * 1e3:.1f} ms, "
          f"{in_flight} of 24 explains still in flight after sampling")
    assert statuses == [200] * 20 and results == [200] * 24
    assert in_flight > 0
    assert median < 0.05 and worst < 0.5
