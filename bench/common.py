"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, versions: str) -> dict[str, str]:
    """Date, machine (CPU, threads, load at start), device name and library versions."""
    try:
        load = f", load average {os.getloadavg()[0]:.1f} at start"
    except OSError:
        load = ""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}, {cpu_name()}, {torch.get_num_threads()} threads{load}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": f"torch {torch.__version__}, {versions}, python {platform.python_version()}",
    }


def add_cudnn_flag(parser) -> None:
    """``--cudnn-benchmark``: let cuDNN time its kernels per shape. The service leaves this off by
    default (``UNBOX_CUDNN_BENCHMARK``): the first run of every new batch shape pays for the
    timing, seconds each; benchmarks follow the service unless told otherwise."""
    parser.add_argument("--cudnn-benchmark", dest="cudnn_benchmark", action="store_true",
                        help="cuDNN kernels timed per shape instead of the service default (chosen by heuristics)")


def apply_cudnn_flag(args) -> None:
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
