"""I-GOS / I-GOS++ faithfulness and speed, next to Grad-CAM, Score-CAM and the reference figures.

    python -m bench.igos                 # full run: 4 photos, reference settings + CPU preset
    python -m bench.igos --quick         # one photo, CPU preset only, 10 metric steps
    python -m bench.igos --images chelsea coffee --metric-steps 20 --no-reference-settings

Faithfulness: every map (I-GOS, I-GOS++, Grad-CAM, Score-CAM when ``explainers.cam`` has it,
pytorch-grad-cam's Grad-CAM, a seeded random 28 x 28 map) is scored by
:func:`explainers.metrics.deletion_insertion` under ONE protocol (blurred baseline, softmax
probability of the top-1 class, ``--metric-steps`` steps, stable sort, trapezoidal AUC) on
scikit-image's chelsea, coffee, rocket and astronaut with efficientnet_lite0. The reference
figures (the IGOS_pp implementation with its own 28 x 28 blur metric) are shown beside them:
I-GOS++ 0.096 / 0.481 and Grad-CAM 0.111 / 0.386 (mean deletion / insertion AUC). Every map is
also scored under the papers' own protocol (``unit="cell"``: 28 x 28 cells, soft aligned-corner
reveal, right Riemann sum) so that those figures can be compared like for like.

Speed: seconds per image for I-GOS / I-GOS++ at the reference settings (28 x 28 mask,
I-GOS++ 20 iterations of 15 steps, line search from 1000) and for the CPU preset; the
reference took 2.5-3.1 s (I-GOS++) and 0.85-1.15 s (I-GOS) per image on an H200. Timings are
the median of ``--repeats`` runs (synchronised on CUDA) after one warm-up per method on the first
image (none with ``--quick``).

Seeds: I-GOS and I-GOS++ draw fresh noise for every path image, so one seed's four-photo mean is
one draw of a noisy estimate (it moved by up to 0.04 in insertion AUC between seeds on the CPU
preset). ``--seeds N`` runs every I-GOS row with seeds 0..N-1, reports the mean over all runs and
the range of the per-seed four-photo means, which is what a single reference figure must be
compared with.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch

from bench.common import add_cudnn_flag, apply_cudnn_flag, cpu_name, record_section
from explainers.baselines import make_baseline
from explainers.cam import GradCAM
from explainers.execution import Execution
from explainers.igos import IGOS, IGOSConfig, IGOSPlusPlus, IGOSPlusPlusConfig
from explainers.metrics import deletion_insertion

IMAGES = ("chelsea", "coffee", "rocket", "astronaut")
REFERENCE_AUC = {"igos++": (0.096, 0.481), "gradcam": (0.111, 0.386)}
REFERENCE_SECONDS = {"igos++": (2.5, 3.1), "igos": (0.85, 1.15)}
VARIANTS = {"igos": IGOS, "igos++": IGOSPlusPlus}


@dataclass
class Row:
    name: str
    deletion: list[float] = field(default_factory=list)
    insertion: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cell_deletion: list[float] = field(default_factory=list)
    cell_insertion: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    reference: str = ""

    def mean(self, values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    def seed_range(self, values: list[float]) -> tuple[float, float] | None:
        """Lowest and highest per-seed mean over the photos (None with one seed)."""
        if len(set(self.seeds)) < 2:
            return None
        per_seed = [statistics.fmean(v for v, s in zip(values, self.seeds) if s == seed) for seed in sorted(set(self.seeds))]
        return min(per_seed), max(per_seed)

    def papers_cell(self) -> str:
        """``deletion / insertion`` under the papers' protocol, with the per-seed range when seeded."""
        text = f"{self.mean(self.cell_deletion):.3f} / {self.mean(self.cell_insertion):.3f}"
        deletion, insertion = self.seed_range(self.cell_deletion), self.seed_range(self.cell_insertion)
        if deletion and insertion:
            text += (f" (seeds: {deletion[0]:.3f}-{deletion[1]:.3f} / {insertion[0]:.3f}-{insertion[1]:.3f})")
        return text


def load_images(names: list[str]):
    from PIL import Image
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in names}


def score_both(execution: Execution, inputs: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor,
               baseline: torch.Tensor, info: dict, steps: int) -> tuple[float, float, float, float]:
    """Deletion and insertion AUC of one map over pixels (trapezoid), then under the papers'
    protocol (28 x 28 cells, right Riemann sum), scored by ``execution`` (a model's, e.g.
    ``model.execution``)."""
    pixels = deletion_insertion(execution, inputs, saliency, labels, steps=steps, baseline=baseline,
                                baseline_description=info)
    cells = deletion_insertion(execution, inputs, saliency, labels, steps=steps, baseline=baseline,
                               unit="cell", auc="right")
    return (float(pixels.deletion_auc[0]), float(pixels.insertion_auc[0]),
            float(cells.deletion_auc[0]), float(cells.insertion_auc[0]))


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def pytorch_grad_cam_map(module, layer: str, inputs: torch.Tensor, target: int) -> torch.Tensor | None:
    """pytorch-grad-cam's Grad-CAM map (the comparison users make); None when not installed."""
    try:
        from pytorch_grad_cam import GradCAM as ReferenceGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None
    with ReferenceGradCAM(model=module, target_layers=[module.get_submodule(layer)]) as cam:
        # frozen parameters: the input must ask for gradients or no graph reaches the layer
        grayscale = cam(input_tensor=inputs.clone().requires_grad_(True), targets=[ClassifierOutputTarget(target)])
    return torch.from_numpy(grayscale).to(inputs.device)


def speed_only(name: str, images: dict, preprocessor, device: torch.device, repeats: int) -> list[float]:
    """Seconds per image of I-GOS++ at the reference settings on a torchvision model with
    random weights (the work per iteration does not depend on the weights; the line search's
    trial count does a little)."""
    import torchvision

    torch.manual_seed(0)
    module = torchvision.models.get_model(name, weights=None, num_classes=1000)
    module = module.eval().requires_grad_(False).to(device)
    explainer = IGOSPlusPlus(Execution(module), IGOSPlusPlusConfig())
    seconds = []
    for index, image in enumerate(images.values()):
        inputs, _ = preprocessor.to_input(image)
        inputs = inputs.to(device)
        target = int(module(inputs)[0].argmax())
        if index == 0:
            timed(lambda: explainer.explain(inputs, target), device)  # warm-up
        runs = [timed(lambda: explainer.explain(inputs, target), device)[1] for _ in range(max(1, repeats))]
        seconds.append(statistics.median(runs))
        print(f"{name:10s} igos++ (reference settings) {seconds[-1]:.2f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", default=list(IMAGES), choices=IMAGES)
    parser.add_argument("--metric-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per image and method")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run every I-GOS row with seeds 0..N-1 (the noise draws): mean and per-seed range")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-reference-settings", action="store_true", help="skip the (slow on CPU) reference settings")
    parser.add_argument("--quick", action="store_true", help="one photo, CPU preset only, 10 metric steps")
    parser.add_argument("--methods", nargs="+", default=None, metavar="PREFIX",
                        help="only the methods whose row name starts with one of these (e.g. 'igos++' gradcam)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="no untimed first run per method (fine on a CPU, where a run takes seconds)")
    parser.add_argument("--no-docs", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--speed-models", nargs="*", default=[], choices=["convnext_tiny", "resnet50"],
                        help="also time I-GOS++ at the reference settings on these torchvision models "
                             "(random weights: timing only, no faithfulness)")
    add_cudnn_flag(parser)
    args = parser.parse_args()
    apply_cudnn_flag(args)
    if args.quick:
        args.images, args.metric_steps, args.no_reference_settings = args.images[:1], 10, True

    from models import ModelRegistry, load_catalog

    device = torch.device(args.device)
    model = ModelRegistry(load_catalog(None), str(device)).get("efficientnet_lite0")
    module, layer, execution = model.module, model.default_layer, model.execution
    # the CAM rows run exact fp32 (as the explainers' default did before the execution policy)
    exact = execution.with_policy(precision="fp32")
    images = load_images(args.images)

    methods: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {}
    seeded: set[str] = set()
    configs: dict[str, IGOSConfig] = {}
    if not args.no_reference_settings:
        configs["igos (reference settings)"] = IGOSConfig()
        configs["igos++ (reference settings)"] = IGOSPlusPlusConfig()
    configs["igos (cpu preset)"] = IGOSConfig.cpu_preset()
    configs["igos++ (cpu preset)"] = IGOSPlusPlusConfig.cpu_preset()
    for name, config in configs.items():
        variant = name.split(" ")[0]
        methods[name] = (lambda v, c: lambda x, t, seed: VARIANTS[v](execution, c.replace(seed=seed))
                         .explain(x, t).saliency)(variant, config)
        seeded.add(name)
    methods["gradcam"] = lambda x, t, _seed: GradCAM(exact, layer=layer).explain(x, t).saliency
    try:
        from explainers.cam import ScoreCAM

        methods["scorecam"] = lambda x, t, _seed: ScoreCAM(exact, layer=layer).explain(x, t).saliency
    except ImportError:
        pass
    methods["gradcam (pytorch-grad-cam)"] = lambda x, t, _seed: pytorch_grad_cam_map(module, layer, x, t)
    methods["random 28x28 map"] = lambda x, t, _seed: torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0)).to(x.device)
    if args.methods:
        methods = {name: fn for name, fn in methods.items() if name.startswith(tuple(args.methods))}

    rows = {name: Row(name) for name in methods}
    for name, row in rows.items():
        base = name.split(" ")[0]
        if base in REFERENCE_AUC and ("reference" in name or base == "gradcam") and "pytorch" not in name:
            row.reference = "AUC %.3f / %.3f" % REFERENCE_AUC[base]
        if base in REFERENCE_SECONDS and "reference" in name:
            row.reference += ("; " if row.reference else "") + "%.2f-%.2f s on H200" % REFERENCE_SECONDS[base]

    for image_name, image in images.items():
        inputs, _ = model.preprocessor.to_input(image)
        target = int(model.logits(inputs)[0].argmax())
        baseline, info = make_baseline(inputs, "blur")
        labels = torch.tensor([target], device=device)
        for name, explain in methods.items():
            for seed in range(max(1, args.seeds) if name in seeded else 1):
                if image_name == args.images[0] and seed == 0 and not (args.quick or args.no_warmup):
                    timed(lambda: explain(inputs, target, seed), device)  # warm-up
                runs = [timed(lambda: explain(inputs, target, seed), device) for _ in range(max(1, args.repeats))]
                saliency, durations = runs[-1][0], [seconds for _, seconds in runs]
                if saliency is None:
                    continue
                aucs = score_both(execution, inputs, saliency, labels, baseline, info, args.metric_steps)
                row = rows[name]
                for values, auc in zip((row.deletion, row.insertion, row.cell_deletion, row.cell_insertion), aucs):
                    values.append(auc)
                row.seconds.append(statistics.median(durations))
                row.seeds.append(seed)
                print(f"{image_name:10s} {name:30s} seed {seed} del {row.deletion[-1]:.3f} ins {row.insertion[-1]:.3f} "
                      f"(cells: {row.cell_deletion[-1]:.3f} / {row.cell_insertion[-1]:.3f}) "
                      f"{row.seconds[-1]:.2f} s", flush=True)

    header = ("| method | mean deletion AUC (lower better) | mean insertion AUC (higher better) | "
              "papers' protocol: deletion / insertion | s / image | reference (papers' protocol) |")
    lines = [header, "|---|---:|---:|---:|---:|---|"]
    for row in rows.values():
        if not row.deletion:
            continue
        lines.append(f"| {row.name} | {row.mean(row.deletion):.3f} | {row.mean(row.insertion):.3f} | "
                     f"{row.papers_cell()} | "
                     f"{row.mean(row.seconds):.2f} | {row.reference} |")
    ratios = []
    for ours, theirs in (("igos++ (reference settings)", "igos++"), ("igos (reference settings)", "igos")):
        if ours in rows and rows[ours].seconds:
            low, high = REFERENCE_SECONDS[theirs]
            ratios.append(f"{ours}: {low / rows[ours].mean(rows[ours].seconds):.2f}-"
                          f"{high / rows[ours].mean(rows[ours].seconds):.2f}x the reference's speed "
                          f"(reference on an H200, ours on {device.type})")
    for speed_model in args.speed_models:
        seconds = speed_only(speed_model, images, model.preprocessor, device, args.repeats)
        lines.append(f"| igos++ (reference settings) on {speed_model}, random weights (speed only) | - | - | - | "
                     f"{statistics.fmean(seconds):.2f} | 6.5 s on H200 (ConvNeXt-Tiny) |")
    table = "\n".join(lines)
    print()
    print(table)
    for line in ratios:
        print(line)
    if args.no_docs:
        return
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    section = [
        f"\n## I-GOS / I-GOS++ faithfulness and speed — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n",
        f"- machine: {platform.node()} ({platform.platform()}), CPU: {cpu_name()}, "
        f"{torch.get_num_threads()} torch threads, GPU: {gpu}, torch {torch.__version__}",
        f"- command: `python -m bench.igos {' '.join(sys.argv[1:])}`",
        f"- model efficientnet_lite0 on {device.type}"
        + (f" (cuDNN kernels timed per shape: {args.cudnn_benchmark}, batch norm folded, channels-last, bf16)"
           if device.type == "cuda" else "") + f"; images: {', '.join(args.images)}; target: top-1",
        f"- protocol: blurred baseline (kernel 51, sigma 50 at 224), softmax probability, "
        f"{args.metric_steps} steps, stable sort, trapezoidal AUC over pixels; the papers' protocol column: "
        f"the same baseline and steps over 28 x 28 cells, changed cells upsampled bilinearly with aligned "
        f"corners, right Riemann sum (`deletion_insertion(unit='cell', auc='right')`); "
        f"timings: median of {args.repeats} run(s)"
        + (f"; I-GOS rows: seeds 0-{args.seeds - 1}, mean over all runs, and in brackets the range of the "
           f"per-seed means over the photos" if args.seeds > 1 else "")
        + (" (quick run: not representative)" if args.quick else ""),
        "- CPU preset (`preset=cpu` on the igos / igos++ jobs): 28 x 28 mask, 8 iterations of 5 steps, "
        "line search warm-started from the last step: about 7x fewer network passes than the reference "
        "settings (I-GOS++: 160 instead of 1200 path images through forward + backward), at the price of a "
        "less converged, coarser-ranked mask",
        "",
        table,
        "",
        *[f"- {line}" for line in ratios],
    ]
    print(f"written to {record_section(chr(10).join(section), device)}")


if __name__ == "__main__":
    main()
