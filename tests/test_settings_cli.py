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
