"""I-GOS++ at the reference settings under different execution choices, side by side in one run.

    python -m bench.igos_variants                        # every variant, 4 photos, 2 timed runs each
    python -m bench.igos_variants --variants as_loaded default --images chelsea --repeats 1
    python -m bench.igos_variants --quick                # a CPU smoke run: 3 iterations of 3 steps

The algorithm is the same in every variant (28 x 28 mask, 20 iterations of 15 steps, Armijo from
1000, four line-search candidates per forward on CUDA); what changes is how the path images go
through the network:

* ``as_loaded``: the network as loaded (a channels-last private copy on CUDA), bf16 autocast
  (the service default until 2026-11-26 14:00 UTC);
* ``default``: the service default, batch norm folded into the convolutions on CUDA
  (``ExecutionPolicy(network="auto")``, :mod:`explainers.execution.lean`);
* ``fp16``: ``default`` in float16 autocast with a fixed gradient scale
  (``ExecutionPolicy(precision="fp16")``);
* ``compile``: ``default`` through ``torch.compile`` (``ExecutionPolicy(compile=True)``, the
  workers' ``UNBOX_FAST_COMPILE``; compiled on the warm-up).

H200, 2026-11-26 (docs/benchmarks.md): ``default`` 0.72 s against ``as_loaded`` 0.90 s per
image; compiling the network as loaded (then a subclass here, the same ``torch.compile`` call)
took 0.83 -> 0.57 s in its own run; float16 was no faster, and neither was NCHW order (a variant
since removed). A tried "predicted first candidate batch" (scoring candidates up to the previous
iteration's accepted trial first) cut the forward images by 8 % but was slower (more, smaller
forwards) and was removed.

Every variant reports seconds per image (median of ``--repeats`` after one warm-up on the first
photo), the images it pushed through the network, and its deletion / insertion AUC under the
papers' protocol, so a faster variant that changes the masks' quality shows it. Rounding
differences alone move single-seed AUCs by a few hundredths (see ``bench.igos_quirks``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.common import add_cudnn_flag, apply_cudnn_flag, machine_info, record_section
from bench.igos import IMAGES, load_images, score_both, timed
from explainers import igos
from explainers.baselines import make_baseline
from explainers.execution import Execution

# each variant = the ExecutionPolicy fields it changes from the model's execution (the service's)
VARIANTS: dict[str, dict[str, object]] = {
    "as_loaded": {"network": "as_loaded"}, "default": {}, "fp16": {"precision": "fp16"}, "compile": {"compile": True},
}


def run_variant(name: str, execution: Execution, photos: dict, config: igos.IGOSConfig, device: torch.device,
                repeats: int, metric_steps: int) -> dict:
    """Seconds, images and papers'-protocol AUCs of one variant over the photos."""
    explainer = igos.IGOSPlusPlus(execution.with_policy(**VARIANTS[name]), config)
    seconds, deletion, insertion, images = [], [], [], []
    warm_started = time.perf_counter()
    for index, (photo, (inputs, target)) in enumerate(photos.items()):
        if index == 0:
            timed(lambda: explainer.explain(inputs, target), device)
            warm_up = time.perf_counter() - warm_started
        runs = [timed(lambda: explainer.explain(inputs, target), device) for _ in range(max(1, repeats))]
        result = runs[0][0]
        seconds.append(statistics.median(t for _, t in runs))
        base, info = make_baseline(inputs, "blur")
        *_, cell_del, cell_ins = score_both(execution, inputs, result.saliency, result.targets, base, info,
                                            metric_steps)
        deletion.append(cell_del)
        insertion.append(cell_ins)
        counts = result.details["images_evaluated"]
        images.append(counts["forward"] + counts["forward_backward"])
        print(f"{name:10s} {photo:10s} {seconds[-1]:.3f} s  del {cell_del:.3f} ins {cell_ins:.3f}  "
              f"images {counts}  precision {result.details['precision']}", flush=True)
    return {"name": name, "seconds": seconds, "deletion": deletion, "insertion": insertion, "images": images,
            "warm_up": warm_up}


def table(rows: list[dict], baseline_seconds: float | None) -> list[str]:
    lines = ["| variant | s / image (mean) | per photo s | images / photo (mean) | deletion / insertion "
             "(papers' protocol) | warm-up s | speed-up vs as_loaded |", "|---|---:|---|---:|---|---:|---:|"]
    for row in rows:
        mean = statistics.fmean(row["seconds"])
        ratio = f"{baseline_seconds / mean:.2f}" if baseline_seconds else "-"
        lines.append(f"| {row['name']} | {mean:.3f} | {', '.join(f'{s:.2f}' for s in row['seconds'])} | "
                     f"{statistics.fmean(row['images']):.0f} | {statistics.fmean(row['deletion']):.3f} / "
                     f"{statistics.fmean(row['insertion']):.3f} | {row['warm_up']:.1f} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--images", nargs="+", choices=IMAGES, default=list(IMAGES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--metric-steps", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="3 iterations of 3 steps, one photo, one run")
    parser.add_argument("--no-docs", action="store_true", help="do not append to docs/benchmarks.md")
    add_cudnn_flag(parser)
    args = parser.parse_args()
    apply_cudnn_flag(args)

    from models import ModelRegistry, load_catalog

    device = torch.device(args.device)
    model = ModelRegistry(load_catalog(None), str(device)).get("efficientnet_lite0")
    config = igos.IGOSPlusPlusConfig()
    names, repeats, metric_steps = args.images, args.repeats, args.metric_steps
    if args.quick:
        config = config.replace(iterations=3, steps=3)
        names, repeats, metric_steps = names[:1], 1, 10
    photos = {}
    for name, image in load_images(names).items():
        inputs, _ = model.preprocessor.to_input(image)
        inputs = inputs.to(device)
        photos[name] = (inputs, int(model.logits(inputs)[0].argmax()))
    rows = []
    for name in args.variants:
        try:
            rows.append(run_variant(name, model.execution, photos, config, device, repeats, metric_steps))
        except Exception as exc:  # a variant that cannot run here (e.g. compile without a compiler)
            print(f"{name}: failed: {type(exc).__name__}: {exc}", flush=True)
    baseline = next((statistics.fmean(r["seconds"]) for r in rows if r["name"] == "as_loaded"), None)
    info = machine_info(device, "efficientnet_lite0")
    lines = [f"## I-GOS++ execution variants (reference settings) — {info['date']}", "",
             f"- command: `python -m bench.igos_variants {' '.join(sys.argv[1:])}`",
             f"- machine: {info['machine']}; device: {info['device']}; {info['versions']}",
             f"- cuDNN kernel timing: {torch.backends.cudnn.benchmark}; photos: {', '.join(names)}; "
             f"median of {repeats} run(s) after one warm-up; AUCs from the first timed run, {metric_steps} steps",
             "", *table(rows, baseline), ""]
    print("\n".join(lines))
    if not args.no_docs and not args.quick:
        record_section("\n".join(lines), device)


if __name__ == "__main__":
    main()
