"""The synchronous API over real HTTP with the real default model."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image

from tests.conftest import CAT_CLASSES, CUP, ESPRESSO, jpeg_bytes, left_right_mass


def post(url: str, path: str, image: bytes, timeout: float = 120, headers: dict | None = None, **form) -> httpx.Response:
    return httpx.post(url + path, files={"image": ("image.jpg", image, "image/jpeg")},
                      data={k: str(v) for k, v in form.items()}, timeout=timeout, headers=headers)


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_predict_cat_and_coffee(api_server, chelsea, coffee):
    cat = post(api_server, "/v1/predict", jpeg_bytes(chelsea)).json()
    assert cat["model"] == "efficientnet_lite0"
    assert cat["predictions"][0]["index"] in CAT_CLASSES
    assert "cat" in cat["predictions"][0]["label"].lower()
    scores = [p["score"] for p in cat["predictions"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    cup = post(api_server, "/v1/predict", jpeg_bytes(coffee), top_k=3).json()
    assert len(cup["predictions"]) == 3
    assert cup["predictions"][0]["index"] in (ESPRESSO, CUP)


def test_gradcam_mass_follows_the_class(api_server, cat_and_coffee):
    """Espresso's heat lies on the cup (right half); the cat's on the cat (left half)."""
    image = jpeg_bytes(cat_and_coffee)
    espresso = post(api_server, "/v1/explain", image, target=ESPRESSO).json()
    assert espresso["target"]["index"] == ESPRESSO and espresso["target"]["label"] == "espresso"
    grid = np.array(espresso["heatmap"]["grid"])
    left, right = left_right_mass(grid)
    assert right > 0.7, (left, right)
    full = decode_png(espresso["heatmap"]["png"]).astype(float)
    assert full.shape == (cat_and_coffee.height, cat_and_coffee.width)
    assert left_right_mass(full)[1] > 0.7
    cat = post(api_server, "/v1/explain", image, target=285).json()
    assert left_right_mass(np.array(cat["heatmap"]["grid"]))[0] > 0.7


def test_explain_response_shape(api_server, chelsea):
    body = post(api_server, "/v1/explain", jpeg_bytes(chelsea)).json()
    assert body["method"] == "gradcam" and body["layer"] == "bn2"
    assert body["target"]["index"] == body["predictions"][0]["index"]
    grid = np.array(body["heatmap"]["grid"])
    assert grid.shape == (7, 7) and grid.min() >= 0 and abs(grid.max() - 1) < 1e-3
    assert (body["heatmap"]["width"], body["heatmap"]["height"]) == chelsea.size
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["overlay_png"])))
    assert overlay.mode == "RGB" and overlay.size == chelsea.size
    assert {"decode", "explain", "render", "total"} <= set(body["timing_ms"])


def test_overlay_is_capped_with_aspect_kept(api_server):
    wide = Image.new("RGB", (3000, 1000), (120, 100, 80))
    body = post(api_server, "/v1/explain", jpeg_bytes(wide)).json()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["overlay_png"])))
    assert overlay.size == (1024, 341)
    assert decode_png(body["heatmap"]["png"]).shape == (1000, 3000)


def test_accept_png_returns_the_overlay(api_server, chelsea):
    response = post(api_server, "/v1/explain", jpeg_bytes(chelsea), headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == chelsea.size
    assert int(response.headers["x-unbox-target"]) in CAT_CLASSES


def test_cam_equals_gradcam_on_a_pooled_linear_head(api_server, chelsea):
    """With global average pooling + linear right after the layer, Grad-CAM's weights are the
    head's row / (h*w): both maps must agree. A wrong CAM or Grad-CAM breaks this."""
    image = jpeg_bytes(chelsea)
    cam = np.array(post(api_server, "/v1/explain", image, method="cam").json()["heatmap"]["grid"])
    grad = np.array(post(api_server, "/v1/explain", image, method="gradcam").json()["heatmap"]["grid"])
    assert np.abs(cam - grad).max() < 2e-3


def test_cam_refused_where_the_head_is_not_pool_linear(api_server, chelsea):
    response = post(api_server, "/v1/explain", jpeg_bytes(chelsea), method="cam", layer="blocks.5")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "cam_unsupported"
    assert "linear" in response.json()["error"]["message"]


def test_other_layer_and_catalogue_model(api_server, chelsea):
    body = post(api_server, "/v1/explain", jpeg_bytes(chelsea), layer="blocks.4").json()
    assert body["layer"] == "blocks.4" and np.array(body["heatmap"]["grid"]).shape == (14, 14)
    resnet = post(api_server, "/v1/explain", jpeg_bytes(chelsea), model="resnet18_random", method="cam").json()
    assert resnet["model"] == "resnet18_random" and resnet["layer"] == "layer4"


def test_bad_parameters_are_422(api_server, chelsea):
    image = jpeg_bytes(chelsea)
    cases = [
        ({"model": "no_such_model"}, "unknown_model"),
        ({"method": "lime"}, "unknown_method"),
        ({"layer": "blocks.99"}, "unknown_layer"),
        ({"target": 1000}, "invalid_target"),
        ({"target": -1}, "invalid_target"),
        ({"target": "cat"}, "invalid_parameter"),
        ({"top_k": 0}, "invalid_parameter"),
        ({"top_k": 101}, "invalid_parameter"),
    ]
    for form, code in cases:
        response = post(api_server, "/v1/explain", image, **form)
        assert response.status_code == 422, (form, response.text)
        assert response.json()["error"]["code"] == code, (form, response.json())


def test_concurrent_explains_all_succeed(api_server, chelsea, coffee):
    cat, cup = jpeg_bytes(chelsea.resize((224, 150))), jpeg_bytes(coffee.resize((240, 160)))

    def one(i: int) -> tuple[int, dict]:
        response = post(api_server, "/v1/explain", cat if i % 2 else cup)
        return i, response.json() if response.status_code == 200 else {"status": response.status_code}

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    for i, body in results:
        assert "target" in body, body
        expected = CAT_CLASSES if i % 2 else {ESPRESSO, CUP}
        assert body["target"]["index"] in expected
        grid = np.array(body["heatmap"]["grid"])
        assert grid.shape == (7, 7) and abs(grid.max() - 1) < 1e-3


def test_models_health_metrics_docs(api_server, chelsea):
    models = httpx.get(api_server + "/v1/models").json()
    names = {m["name"]: m for m in models["models"]}
    assert models["default"] == "efficientnet_lite0"
    assert names["efficientnet_lite0"]["loaded"] and names["efficientnet_lite0"]["target_layer"] == "bn2"
    assert "resnet18_random" in names
    assert httpx.get(api_server + "/healthz").json() == {"status": "ok"}
    assert httpx.get(api_server + "/readyz").status_code == 200
    post(api_server, "/v1/predict", jpeg_bytes(chelsea))
    text = httpx.get(api_server + "/metrics").text
    assert 'unbox_http_requests_total{http_method="POST",route="/v1/predict",status="200"}' in text
    assert 'unbox_inference_seconds_count{method="gradcam",model="efficientnet_lite0"}' in text
    docs = httpx.get(api_server + "/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert httpx.get(api_server + "/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert "/v1/explain" in httpx.get(api_server + "/openapi.json").json()["paths"]
    missing = httpx.get(api_server + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_readyz_waits_for_the_fast_path_warm_up(monkeypatch):
    """On CUDA the start-up warm-up (CUDA graphs, compiled runners) takes seconds after the load;
    a balancer must not send traffic before it ends. No GPU here, so the warm-up is a stand-in
    that blocks until released; the load, the app and its readiness logic are the real ones."""
    import threading
    import time

    from fastapi.testclient import TestClient

    import app.main as main
    from app.settings import load_settings
    from explainers.execution import Execution

    release = threading.Event()
    monkeypatch.setattr(Execution, "warm", lambda self, *args, **kwargs: release.wait(60))
    monkeypatch.setenv("UNBOX_MODELS", "efficientnet_lite0")
    with TestClient(main.create_app(load_settings())) as client:
        deadline = time.monotonic() + 120
        while (state := client.get("/readyz")).json()["models"]["efficientnet_lite0"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert state.status_code == 503 and state.json()["models"]["efficientnet_lite0"] == "warming"
        release.set()
        while (state := client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert state.json()["models"]["efficientnet_lite0"] == "loaded"
