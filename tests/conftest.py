"""Shared fixtures: sample photos, the real default model, and a real running API server."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"

# ImageNet class indices used by the tests.
CAT_CLASSES = {281, 282, 283, 284, 285, 286, 287}  # tabby .. Egyptian cat, lynx-like cats
ESPRESSO, CUP = 967, 968


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def chelsea() -> Image.Image:
    """scikit-image's cat photo (451 x 300)."""
    from skimage import data

    return Image.fromarray(data.chelsea())


@pytest.fixture(scope="session")
def coffee() -> Image.Image:
    """scikit-image's espresso photo (600 x 400)."""
    from skimage import data

    return Image.fromarray(data.coffee())


@pytest.fixture(scope="session")
def cat_and_coffee(chelsea: Image.Image, coffee: Image.Image) -> Image.Image:
    """The cat on the left half, the coffee cup on the right half (each 320 x 320)."""
    side = 320
    canvas = Image.new("RGB", (2 * side, side))
    canvas.paste(chelsea.resize((side, side), Image.Resampling.BILINEAR), (0, 0))
    canvas.paste(coffee.resize((side, side), Image.Resampling.BILINEAR), (side, 0))
    return canvas


@pytest.fixture(scope="session")
def registry():
    """The real catalogue on the CPU (models load on first use and stay warm)."""
    from models import ModelRegistry, load_catalog

    return ModelRegistry(load_catalog(None), "cpu")


@pytest.fixture(scope="session")
def default_model(registry):
    """The offline default model, efficientnet_lite0, with its real pretrained weights."""
    return registry.get("efficientnet_lite0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("server did not become ready")


def start_api(env_overrides: dict[str, str], log_path: Path, command: str = "api",
              args: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:
    """Start ``unbox <command> [args]`` as a real process on a free port; returns it and its base URL."""
    port = free_port()
    # No per-address rate limit unless a test asks for one: the suite's clients all share 127.0.0.1.
    env = {**os.environ, "UNBOX_HOST": "127.0.0.1", "UNBOX_PORT": str(port), "UNBOX_LOG_LEVEL": "warning",
           "UNBOX_RATE_LIMIT_PER_MINUTE": "0", **env_overrides}
    log = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, "-m", "app.cli", command, *args], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
    except RuntimeError:
        process.kill()
        raise RuntimeError(f"{command} failed to start: {log_path.read_text(errors='replace')[-3000:]}")
    return process, url


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def resnet_catalog(tmp_path_factory) -> Path:
    """A catalogue declaring a torchvision ResNet-18 with fixed random weights saved to a file."""
    import torch
    import torchvision

    folder = tmp_path_factory.mktemp("catalog")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=1000)
    torch.save(model.state_dict(), folder / "resnet18_random.pt")
    (folder / "catalog.toml").write_text(
        '[models.resnet18_random]\n'
        'source = "torchvision:resnet18"\n'
        'weights = "resnet18_random.pt"\n'
        'labels = "imagenet"\n'
        'target_layer = "layer4"\n'
        'description = "ResNet-18 with fixed random weights (tests)"\n'
    )
    return folder / "catalog.toml"


@pytest.fixture(scope="session")
def api_server(artifacts: Path, resnet_catalog: Path) -> Iterator[str]:
    """A real ``unbox api`` process (real model, real HTTP) for the whole session."""
    process, url = start_api({"UNBOX_CATALOG": str(resnet_catalog), "UNBOX_MAX_UPLOAD_BYTES": str(8 * 1024 * 1024),
                              "UNBOX_MAX_CONCURRENT_INFERENCE": "2"}, artifacts / "api-server.log")
    yield url
    stop(process)


def left_right_mass(saliency: np.ndarray) -> tuple[float, float]:
    """Share of a map's mass on the left and right halves."""
    half = saliency.shape[1] // 2
    total = float(saliency.sum()) + 1e-12
    return float(saliency[:, :half].sum()) / total, float(saliency[:, half:].sum()) / total
