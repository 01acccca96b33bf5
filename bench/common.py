"""What every benchmark records about the machine it ran on, and where its figures go."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
DOCS_HEADER = "# Benchmarks\n\nEach section is written by the benchmark that produced it.\n"
# the parts of docs/benchmarks.md, in order; a section goes at the end of its device's part
CPU_PART = "# On the 2-core CPU"
GPU_PART = "# On an NVIDIA"
NOTES_PART = "# Reading these figures"


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


def record_section(section: str, device: torch.device | str, docs: Path = DOCS) -> Path:
    """Write a benchmark's ``section`` into ``docs`` at the end of its device's part (CPU
    figures before the first GPU part, GPU figures before the reading notes), or at the end
    of the file when it has no such part; returns the file."""
    docs.parent.mkdir(parents=True, exist_ok=True)
    text = docs.read_text(encoding="utf-8") if docs.exists() else DOCS_HEADER
    following = (GPU_PART, NOTES_PART) if torch.device(device).type == "cpu" else (NOTES_PART,)
    lines = text.splitlines(keepends=True)
    at = next((index for index, line in enumerate(lines) if line.startswith(following)), len(lines))
    before, after = "".join(lines[:at]), "".join(lines[at:])
    block = "\n" + section.strip("\n") + "\n" + ("\n" if after else "")
    docs.write_text(before.rstrip("\n") + "\n" + block + after, encoding="utf-8")
    return docs
