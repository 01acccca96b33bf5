"""Grad-CAM and Score-CAM: ours against pytorch-grad-cam, same model, layer, input and target.

    python -m bench.cams                # full run: 3 models x 2 methods, appends to docs/benchmarks.md
    python -m bench.cams --quick        # small input, one repeat: checks that everything runs
    python -m bench.cams --models efficientnet_lite0 --methods scorecam --repeats 1

Models: efficientnet_lite0 (real weights, ``bn2``), ResNet-50 (``layer4``) and ConvNeXt-Tiny
(``features.7``), both torchvision with random weights (fine for timing; note that random
weights leave fewer dead channels than trained ones, so Score-CAM's constant-channel saving is
smaller there). The input is the cat photo; the target is our top-1 class, given to both.
Grad-CAM on efficientnet_lite0 is also compared with a bare forward + backward (full forward
with autograd, target logit back-propagated to the input): the floor any Grad-CAM pays.

Ours runs with the execution policy the service would use on that device (CPU: exact fp32;
CUDA: fp16 autocast + channels_last + CUDA graphs, warmed before timing). Timings are the median of
``--repeats`` runs after one warm-up run; on CUDA every run is synchronised.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import DOCS, machine_info, record_section
from explainers.cam import GradCAM, ScoreCAM, ScoreCAMConfig
from explainers.execution import Execution, ExecutionPolicy

MODELS = {
    "efficientnet_lite0": ("builtin", "bn2"),
    "resnet50": ("torchvision", "layer4"),
    "convnext_tiny": ("torchvision", "features.7"),
}


@dataclass
class Row:
    model: str
    method: str
    ours_ms: float
    reference_ms: float | None
    reference: str
    correlation: float | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if not self.reference_ms else self.reference_ms / self.ours_ms


def load_model(name: str, device: torch.device) -> nn.Module:
    kind, _ = MODELS[name]
    if kind == "builtin":
        from models import ModelRegistry, load_catalog

        # no warm-up at load: the execution timed here is the benchmark's own (see bench_model)
        return ModelRegistry(load_catalog(None), str(device), ExecutionPolicy(warmup=False)).get(name).module
    import torchvision

    torch.manual_seed(0)
    module = torchvision.models.get_model(name, weights=None, num_classes=1000)
    return module.eval().requires_grad_(False).to(device)


def sample_input(size: int, device: torch.device) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.chelsea()).resize((size, size), Image.Resampling.BILINEAR)
    unit = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((unit - mean) / std).to(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device, warmup: bool = True) -> tuple[float, object]:
    """Median milliseconds of ``repeats`` runs (after one warm-up run), and the last result."""
    result = fn() if warmup else None
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples), result


def correlation(ours: torch.Tensor, reference: np.ndarray) -> float:
    size = reference.shape[-2:]
    up = F.interpolate(ours[None].float().cpu(), size=size, mode="bilinear", align_corners=False)[0].numpy()
    return float(np.corrcoef(up.ravel(), reference.ravel())[0, 1])


def reference_cam(method: str, module: nn.Module, layer: str, batch_size: int):
    from pytorch_grad_cam import GradCAM as RefGrad
    from pytorch_grad_cam import ScoreCAM as RefScore

    twin = copy.deepcopy(module).requires_grad_(True)  # it needs parameters that require grad
    cam = (RefGrad if method == "gradcam" else RefScore)(model=twin, target_layers=[twin.get_submodule(layer)])
    if method == "scorecam":
        cam.batch_size = batch_size
    return cam


def bare_forward_backward(module: nn.Module, inputs: torch.Tensor, target: int) -> Callable[[], object]:
    def run() -> object:
        x = inputs.detach().clone().requires_grad_(True)
        module(x)[0, target].backward()
        return x.grad

    return run


def bench_model(name: str, methods: list[str], args: argparse.Namespace, device: torch.device,
                policy: ExecutionPolicy) -> list[Row]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    _, layer = MODELS[name]
    module = load_model(name, device)
    execution = Execution(module, policy.with_changes(memory_budget_mb=args.memory_mb))
    inputs = sample_input(args.size, device)
    with torch.inference_mode():
        target = int(module(inputs).argmax())
    targets = [ClassifierOutputTarget(target)]
    rows = []
    for method in methods:
        if method == "gradcam":
            ours = GradCAM(execution, layer=layer)
        else:
            ours = ScoreCAM(execution, ScoreCAMConfig(), layer=layer)  # exact: every channel
        # Score-CAM on the CPU runs for tens of seconds per call: no warm-up run (nothing to compile)
        warmup = device.type == "cuda" or method == "gradcam"
        ours_ms, explanation = timed(lambda: ours.explain(inputs, target), args.repeats, device, warmup)
        note = ", ".join(f"{k}={v}" for k, v in explanation.details.items() if k != "total_channels")
        reference_ms = corr = None
        if not args.no_reference:
            cam = reference_cam(method, module, layer, args.reference_batch)
            reference_repeats = args.repeats if method == "gradcam" else args.reference_repeats
            reference_ms, maps = timed(lambda: cam(inputs, targets=targets), reference_repeats, device, warmup)
            corr = correlation(explanation.saliency, maps)
        rows.append(Row(name, method, ours_ms, reference_ms, "pytorch-grad-cam", corr, note))
        if method == "scorecam" and explanation.details.get("runtime") == "onnxruntime":
            # the same Score-CAM with PyTorch running the masked forwards (explainers.execution.onnx_cpu)
            eager = ScoreCAM(execution.with_policy(cpu_runtime="torch"), ScoreCAMConfig(), layer=layer)
            eager_ms, eager_map = timed(lambda: eager.explain(inputs, target), args.repeats, device, warmup)
            rows.append(Row(name, "scorecam vs PyTorch forwards", ours_ms, eager_ms, "ours with PyTorch forwards",
                            correlation(explanation.saliency, eager_map.saliency.cpu().numpy()),
                            "ratio = PyTorch forwards / ONNX Runtime forwards"))
        if method == "gradcam" and name == "efficientnet_lite0":
            bare_ms, _ = timed(bare_forward_backward(module, inputs, target), args.repeats, device)
            rows.append(Row(name, "gradcam vs bare fwd+bwd", ours_ms, bare_ms, "bare forward+backward", None,
                            "ratio = bare / ours (>= 0.8 means within 1.25x)"))
    return rows


def machine(device: torch.device) -> dict[str, str]:
    import pytorch_grad_cam
    import torchvision

    return machine_info(device, f"torchvision {torchvision.__version__}, "
                                f"grad-cam {getattr(pytorch_grad_cam, '__version__', '1.5.x')}")


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = ["| model | method | ours ms | comparison ms | comparison | ratio (comparison/ours) | map corr | ours ran |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.method} | {fmt(r.ours_ms)} | {fmt(r.reference_ms)} | {r.reference} | "
                     f"{fmt(r.ratio, 2)} | {fmt(r.correlation, 4)} | {r.note} |")
    return "\n".join(lines)


def goals(rows: list[Row], device: torch.device) -> list[str]:
    """Issue 3's goals (and issue 2's Grad-CAM goal) checked against this run's rows."""
    found = {(r.model, r.method): r for r in rows}
    checks: list[tuple[str, Row | None, Callable[[Row], bool]]] = []
    if device.type == "cuda":
        checks += [
            ("ConvNeXt-Tiny exact Score-CAM <= 60 ms", found.get(("convnext_tiny", "scorecam")),
             lambda r: r.ours_ms <= 60),
            ("ResNet-50 exact Score-CAM <= 100 ms and >= 6x pytorch-grad-cam", found.get(("resnet50", "scorecam")),
             lambda r: r.ours_ms <= 100 and (r.ratio or 0) >= 6),
            ("Grad-CAM <= 5 ms per image (efficientnet_lite0)", found.get(("efficientnet_lite0", "gradcam")),
             lambda r: r.ours_ms <= 5),
        ]
    else:
        checks.append(("exact Score-CAM >= 2.8x pytorch-grad-cam (efficientnet_lite0)",
                       found.get(("efficientnet_lite0", "scorecam")), lambda r: (r.ratio or 0) >= 2.8))
    checks += [
        ("Grad-CAM >= 4x pytorch-grad-cam (efficientnet_lite0)", found.get(("efficientnet_lite0", "gradcam")),
         lambda r: (r.ratio or 0) >= 4),
        ("Grad-CAM within 1.25x of bare forward+backward", found.get(("efficientnet_lite0", "gradcam vs bare fwd+bwd")),
         lambda r: (r.ratio or 0) >= 0.8),
    ]
    return [f"- {name}: {'met' if check(row) else 'missed'}" for name, row, check in checks if row is not None]


def append_docs(info: dict[str, str], args: argparse.Namespace, rows: list[Row]) -> None:
    mode = "quick check (not a measurement)" if args.quick else "full run"
    section = (f"\n## CAMs: ours vs pytorch-grad-cam ({info['date']}, {mode})\n\n"
               f"- command: `python -m bench.cams {' '.join(args.argv)}`\n"
               f"- machine: {info['machine']}\n- device: {info['device']}\n- versions: {info['versions']}\n"
               f"- input: cat photo at {args.size} x {args.size}, target = top-1, median of {args.repeats} "
               f"(pytorch-grad-cam Score-CAM: {args.reference_repeats}); one warm-up run first except for "
               f"Score-CAM on the CPU\n"
               f"- ours: {args.fast}\n\n"
               f"{table(rows)}\n\n" + "\n".join(goals(rows, args.device_used)) + "\n")
    record_section(section, args.device_used)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Device, input size and repeats: the options every CAM benchmark shares."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--repeats", type=int, default=5)


def add_execution_options(parser: argparse.ArgumentParser) -> None:
    """How ours runs (memory budget, precision, compile, graphs) and what is timed and recorded."""
    parser.add_argument("--memory-mb", type=float, default=None,
                        help="our Score-CAM memory budget (default 512 on the CPU, 4096 on CUDA)")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile our fixed-shape forwards (CUDA)")
    parser.add_argument("--no-graphs", action="store_true", help="no CUDA graphs for ours")
    parser.add_argument("--no-reference", action="store_true", help="time ours only")
    parser.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cams", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=["gradcam", "scorecam"], default=["gradcam", "scorecam"])
    add_run_options(parser)
    parser.add_argument("--reference-repeats", type=int, default=None,
                        help="repeats of pytorch-grad-cam's Score-CAM (default: 1 on CPU, --repeats on CUDA)")
    parser.add_argument("--reference-batch", type=int, default=16, help="pytorch-grad-cam Score-CAM batch (its default)")
    add_execution_options(parser)
    parser.add_argument("--quick", action="store_true", help="64-px input, one repeat: a smoke run")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    if args.quick:
        args.size, args.repeats = 64, 1
    return args


def prepare(args: argparse.Namespace) -> tuple[torch.device, ExecutionPolicy]:
    """The device and our execution policy for a run (CPU: exact fp32; CUDA: the options),
    with the memory budget defaulted and pytorch-grad-cam's progress bars silenced."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.memory_mb is None:
        args.memory_mb = 4096.0 if device.type == "cuda" else 512.0
    policy = ExecutionPolicy() if device.type != "cuda" else ExecutionPolicy(  # CPU: exact fp32
        precision=args.precision, compile=args.compile, cuda_graphs=not args.no_graphs)
    warnings.filterwarnings("ignore")
    try:  # pytorch-grad-cam prints a tqdm bar per Score-CAM batch loop
        import tqdm
        from functools import partialmethod

        tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)  # type: ignore[method-assign]
    except ImportError:
        pass
    args.fast, args.device_used = policy, device
    return device, policy


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device, policy = prepare(args)
    if args.reference_repeats is None:
        args.reference_repeats = args.repeats if device.type == "cuda" else 1
    info = machine(device)
    rows: list[Row] = []
    for name in args.models:
        rows.extend(bench_model(name, args.methods, args, device, policy))
        print(f"{name}: done", flush=True)
    print(f"\n{info['date']} | {info['machine']} | {info['device']} | {info['versions']}\n")
    print(table(rows))
    print("\n".join(goals(rows, device)))
    if not args.no_append:
        append_docs(info, args, rows)
        print(f"\nwritten to {DOCS}")


if __name__ == "__main__":
    main()
