"""Settings fail fast and readably; the offline `unbox explain` command works without a server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from app.settings import SettingsError, load_settings
from tests.conftest import REPO, jpeg_bytes


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("UNBOX_MODELS", "efficientnet_lite0, other")
    monkeypatch.setenv("UNBOX_PORT", "9001")
    settings = load_settings()
    assert settings.models == ["efficientnet_lite0", "other"] and settings.port == 9001


def test_torch_switches_follow_the_settings(monkeypatch):
    import torch

    before = (torch.get_num_threads(), torch.backends.cudnn.benchmark)
    try:
        monkeypatch.setenv("UNBOX_TORCH_THREADS", "1")
        monkeypatch.setenv("UNBOX_CUDNN_BENCHMARK", "false")
        load_settings().apply_to_torch()
        assert (torch.get_num_threads(), torch.backends.cudnn.benchmark) == (1, False)
        monkeypatch.setenv("UNBOX_CUDNN_BENCHMARK", "true")
        load_settings().apply_to_torch()
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.set_num_threads(before[0])
        torch.backends.cudnn.benchmark = before[1]


@pytest.mark.parametrize("name,value", [("UNBOX_PORT", "not-a-port"), ("UNBOX_DEVICE", "gpu"),
                                        ("UNBOX_MAX_UPLOAD_BYTES", "-5"), ("UNBOX_CATALOG", "/no/such.toml")])
def test_invalid_settings_are_named(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_api_refuses_to_start_with_bad_settings():
    result = run_cli("api", env={"UNBOX_PORT": "70000"})
    assert result.returncode == 2
    assert "UNBOX_PORT" in result.stderr and "Traceback" not in result.stderr


def test_api_refuses_unknown_startup_model():
    result = run_cli("api", env={"UNBOX_MODELS": "nonexistent"})
    assert result.returncode == 2 and "nonexistent" in result.stderr


def test_offline_explain_writes_an_overlay(tmp_path, chelsea):
    image = tmp_path / "cat.jpg"
    image.write_bytes(jpeg_bytes(chelsea))
    out, gray = tmp_path / "overlay.png", tmp_path / "map.png"
    result = run_cli("explain", str(image), "--method", "gradcam", "-o", str(out), "--map", str(gray))
    assert result.returncode == 0, result.stderr
    assert "cat" in result.stdout.splitlines()[0].lower()
    assert Image.open(out).size == chelsea.size and Image.open(gray).mode == "L"


def test_offline_explain_refuses_a_text_file(tmp_path):
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("hello")
    result = run_cli("explain", str(bogus))
    assert result.returncode == 2 and "supported format" in result.stderr


def test_a_worker_with_a_configuration_error_exits_2() -> None:
    """Exit 2 tells a supervisor that a restart will not help (an unknown model here); a Redis
    that cannot be reached is not such an error (the worker waits for it)."""
    done = run_cli("worker", env={"UNBOX_REDIS_URL": "redis://127.0.0.1:1/0", "UNBOX_MODELS": "no_such_model"})
    assert done.returncode == 2
    assert "UNBOX_MODELS names 'no_such_model'" in done.stderr
    missing = run_cli("worker", env={"UNBOX_REDIS_URL": ""})
    assert missing.returncode == 2 and "UNBOX_REDIS_URL is not set" in missing.stderr


def test_version_is_the_package_version() -> None:
    from importlib.metadata import version

    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"unbox {version('unbox')}"


@pytest.mark.parametrize("command", ["api", "serve"])
def test_listen_options_are_checked(command: str) -> None:
    done = run_cli(command, "--port", "70000")
    assert done.returncode == 2 and "--port" in done.stderr and "65535" in done.stderr


def test_serve_listens_where_told_logs_json_and_never_prints_the_redis_password(tmp_path) -> None:
    """``--host`` / ``--port`` win over UNBOX_HOST / UNBOX_PORT; with UNBOX_LOG_FORMAT=json the API's
    (its ``unbox`` loggers have a handler), uvicorn's and the worker's lines are JSON, request ids
    included; the embedded Redis is announced without its password, which no output shows. No
    model is loaded (UNBOX_MODELS empty), to keep it quick."""
    import json
    import re
    import signal
    import time

    import httpx

    from tests.conftest import free_port, wait_until_ready

    port = free_port()
    env = {**os.environ, "UNBOX_HOST": "localhost", "UNBOX_PORT": str(free_port()), "UNBOX_LOG_FORMAT": "json",
           "UNBOX_LOG_LEVEL": "info", "UNBOX_MODELS": "", "UNBOX_TORCH_THREADS": "1", "UNBOX_REDIS_URL": ""}
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port",
                                    str(port)], cwd=REPO, env=env, stdout=stdout, stderr=stderr)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", process)
        deadline = time.monotonic() + 120
        while httpx.get(f"http://127.0.0.1:{port}/readyz").json()["queue"].get("workers", {}).get("alive", 0) < 1:
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.2)
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"X-Request-ID": "cli-check-1"})
        assert answer.headers["x-request-id"] == "cli-check-1"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    printed, logged = out.read_text(), err.read_text()
    assert f"Unbox on http://127.0.0.1:{port} " in printed
    assert re.search(r"Redis embedded at redis://127\.0\.0\.1:\d+/0;", printed), printed
    assert not re.search(r"redis://[^\s/]*:(?!\*\*\*@)[^\s@]+@", printed + logged), "a Redis password was shown"
    lines = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    assert not any(line["level"] == "ERROR" for line in lines), logged
    assert any(line["logger"].startswith("uvicorn") and f"127.0.0.1:{port}" in line["message"] for line in lines)
    assert any(line["logger"] == "unbox.worker" and "taking jobs" in line["message"] for line in lines), logged
    request = [line for line in lines if line.get("request_id") == "cli-check-1"]
    assert request and request[0]["route"] == "/v1/models" and request[0]["status"] == 200, request
