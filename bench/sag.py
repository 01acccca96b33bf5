"""Structured Attention Graphs: root search + whole graph per photo, against the reference figures.

    python -m bench.sag                     # four photos, ours batched and ours at batch size 1
    python -m bench.sag --quick             # the cat photo only, no batch-1 run: checks that it runs
    python -m bench.sag --images chelsea --repeats 3 --ordering gradcam

The reference implementation (viv92/structured-attention-graphs) scores every patch set in its
own forward pass at batch size 1; its figures with efficientnet_lite0 are quoted from the issue:
root search alone 30.9 s for the cat photo on the 2-core CPU, 2.4-25.6 s per photo (mean 10.8 s
over four photos) on an NVIDIA H200, 475-6687 forward passes per photo.

Side by side in one run: ours as the service runs it (every search step, minimisation round and
graph level one batched forward; scores cached by patch set) and the same search with one image
per forward (``ExecutionPolicy(images_per_forward=1)``: the reference's way of running the
network, with our cache; the coarse I-GOS ordering then also runs one image per forward). The
forward counts are images through the network; "asked" counts the patch sets the algorithm
requested (what an implementation without a cache would evaluate). Where scoring is incremental
(a CPU by default: one-patch changes through a crop of the early layers), the same search with
every image through the whole network runs beside it ("whole-forward"), and where ONNX Runtime
runs the forwards (a CPU with it installed), the same search with PyTorch running them
("PyTorch-forward"). Times are the median of
``--repeats`` runs after one untimed explanation of the first photo; on CUDA every run ends
with a device sync (the search's per-step score copy already syncs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from bench.common import DOCS, add_cudnn_flag, apply_cudnn_flag, machine_info, record_section
from explainers.execution import Execution
from explainers.sag import SAG, SAGConfig, SAGResult

REFERENCE_CPU_CAT_S = 30.9  # reference root search only, cat photo, 2-core CPU
REFERENCE_GPU_S = (2.4, 25.6, 10.8)  # reference root search per photo on an H200: min, max, mean
PHOTOS = ("chelsea", "coffee", "astronaut", "cat_and_coffee")


def photo(name: str) -> Image.Image:
    """scikit-image sample photos (the test suite's), and the cat + coffee composite."""
    from skimage import data

    if name == "cat_and_coffee":
        side = 320
        canvas = Image.new("RGB", (2 * side, side))
        canvas.paste(photo("chelsea").resize((side, side), Image.Resampling.BILINEAR), (0, 0))
        canvas.paste(photo("coffee").resize((side, side), Image.Resampling.BILINEAR), (side, 0))
        return canvas
    return Image.fromarray(getattr(data, name)()).convert("RGB")


@dataclass
class Row:
    image: str
    label: str
    result: SAGResult
    seconds: float
    unbatched_seconds: float | None
    first_seconds: float  # the first run in the process for this photo (new batch shapes pay there)
    whole_seconds: float | None  # the same search with every image through the whole network
    torch_seconds: float | None  # the same search with PyTorch running the forwards (ours: ONNX Runtime)

    @property
    def forward(self) -> dict[str, int]:
        return self.result.details["forward"]

    @property
    def phase_s(self) -> dict[str, float]:
        return {k: v / 1e3 for k, v in self.result.details["timing_ms"].items()}


def run_once(sag: SAG, inputs: torch.Tensor) -> tuple[SAGResult, float]:
    started = time.perf_counter()
    result = sag.explain(inputs)
    if inputs.device.type == "cuda":
        torch.cuda.synchronize(inputs.device)
    return result, time.perf_counter() - started


def make_sag(model, execution: Execution, config: SAGConfig) -> SAG:
    return SAG(execution, config, model.default_layer, model.normalization)


def bench_photo(name: str, model, execution: Execution, config: SAGConfig, args: argparse.Namespace) -> Row:
    inputs, _ = model.preprocessor.to_input(photo(name))

    def explainer(**changes: object) -> SAG:
        """Ours under ``execution``'s policy with ``changes`` (the same model and variants)."""
        return make_sag(model, execution.with_policy(**changes) if changes else execution, config)

    sag = explainer()
    with torch.inference_mode():  # warm-up: allocator, kernels
        model.module(inputs.contiguous(memory_format=torch.channels_last))
    runs = [run_once(sag, inputs)]
    # the comparisons alternate with ours run by run, so that a shared machine's drifting speed
    # falls on all alike: every image through the whole network (when ours is incremental), and
    # PyTorch running the forwards (when ours runs them in ONNX Runtime)
    first = runs[0][0].details
    others = {"whole": explainer(incremental="off") if args.whole and first["incremental"] else None,
              "torch": explainer(cpu_runtime="torch") if args.torch and first["runtime"] != "torch" else None}
    others = {kind: other for kind, other in others.items() if other is not None}
    other_runs: dict[str, list[float]] = {kind: [] for kind in others}
    for _ in range(args.repeats if others else args.repeats - 1):
        for kind, other in others.items():
            other_runs[kind].append(run_once(other, inputs)[1])
        if len(runs) < args.repeats:
            runs.append(run_once(sag, inputs))
    result = runs[-1][0]
    seconds = statistics.median(t for _, t in runs)
    unbatched = run_once(explainer(images_per_forward=1), inputs)[1] if args.unbatched else None
    medians = {kind: statistics.median(times) for kind, times in other_runs.items()}
    return Row(name, model.labels[result.target], result, seconds, unbatched, runs[0][1], medians.get("whole"),
               medians.get("torch"))


def busy() -> bool:
    """Whether other processes keep the CPUs busy (1-minute load above the core count); read
    before the run, since the run's own threads (PyTorch's and ONNX Runtime's) raise the load."""
    import os

    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def machine(device: torch.device) -> dict[str, str]:
    return machine_info(device, f"numpy {np.__version__}")


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row], device: torch.device) -> str:
    lines = ["| photo (target) | ordering | roots (sizes) | graph nodes / edges | images (asked) / batches "
             "| incremental images | ordering s | search s | graph s | total s | first run s | whole-forward total s "
             "| incremental gain | PyTorch-forward total s | ONNX Runtime gain | batch-1 total s | batch gain "
             "| reference root search s | reference / ours (search) | reference / ours (total) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f, t = r.forward, r.phase_s
        sizes = ",".join(str(len(root.patches)) for root in r.result.roots) or "none"
        if device.type == "cpu":
            reference = REFERENCE_CPU_CAT_S if r.image == "chelsea" else None
            ref_text = fmt(reference, 1) if reference else "-"
        else:
            reference = REFERENCE_GPU_S[2]
            ref_text = f"{REFERENCE_GPU_S[0]}-{REFERENCE_GPU_S[1]} (mean {REFERENCE_GPU_S[2]})"
        search_s = t["setup"] + t["ordering"] + t["search"]
        gain = r.unbatched_seconds / r.seconds if r.unbatched_seconds else None
        lines.append(
            f"| {r.image} ({r.label}) | {r.result.ordering} | {len(r.result.roots)} ({sizes}) | "
            f"{len(r.result.nodes)} / {len(r.result.edges)}{' (capped)' if r.result.truncated else ''} | "
            f"{f['images']} ({f['requested_sets']}) / {f['scorer_batches'] + 1} | {f.get('incremental_images', 0)} | "
            f"{fmt(t['ordering'])} | {fmt(t['search'])} | {fmt(t['graph'])} | {fmt(r.seconds)} | {fmt(r.first_seconds)} | "
            f"{fmt(r.whole_seconds)} | {fmt(r.whole_seconds / r.seconds if r.whole_seconds else None, 2)} | "
            f"{fmt(r.torch_seconds)} | {fmt(r.torch_seconds / r.seconds if r.torch_seconds else None, 2)} | "
            f"{fmt(r.unbatched_seconds)} | "
            f"{fmt(gain, 1)} | {ref_text} | {fmt(reference / search_s if reference else None, 1)} | "
            f"{fmt(reference / r.seconds if reference else None, 1)} |")
    return "\n".join(lines)


def append_docs(info: dict[str, str], args: argparse.Namespace, config: SAGConfig, rows: list[Row],
                device: torch.device) -> None:
    mode = "quick check (not a measurement)" if args.quick else "full run"
    if args.busy_at_start:
        mode += "; busy shared machine, times are not a measurement (forward counts are)"
    goal = ("goal: root search + whole graph <= 5 s for the cat photo (>= 6x the reference's 30.9 s root search)"
            if device.type == "cpu" else "goal: root search + whole graph <= 0.5 s per photo (>= 20x)")
    section = (f"\n## SAG: root search + graph vs the reference figures ({info['date']}, {mode})\n\n"
               f"- command: `python -m bench.sag {' '.join(args.argv)}`\n"
               f"- machine: {info['machine']}\n- device: {info['device']}\n- versions: {info['versions']}\n"
               f"- model: efficientnet_lite0 (real weights), target = top-1, {config.grid}x{config.grid} crisp "
               f"patches, {config.baseline} baseline, beam {config.beam_width}, successors {config.successors}, "
               f"threshold {config.threshold}, max root size {config.max_root_size}, max roots {config.max_roots}, "
               f"graph from {config.graph_roots} roots (overlap <= {config.overlap_limit}) while >= "
               f"{config.graph_threshold:.0%}, at most {config.max_nodes} nodes; patch-set forwards in "
               f"{rows[0].result.details['runtime'] if rows else '-'}; median of {args.repeats} run(s); "
               f"'first run' = the first of them, which pays for batch shapes the process has not seen\n"
               f"- {goal}; reference figures from the issue (batch-1 reference code, root search only)\n"
               f"- 'images' = images through the network (the forward-pass count, ordering included; batch-1 "
               f"code would run that many forwards), 'asked' = patch sets the search requested\n\n"
               f"{table(rows, device)}\n")
    record_section(section, device)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sag", description=__doc__.split("\n")[0])
    parser.add_argument("--images", nargs="+", choices=PHOTOS, default=list(PHOTOS))
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ordering", choices=["auto", "igos", "gradcam", "occlusion"], default="auto")
    parser.add_argument("--baseline", choices=["black", "blur"], default="black")
    parser.add_argument("--no-unbatched", dest="unbatched", action="store_false",
                        help="skip the batch-size-1 comparison run")
    parser.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--incremental", choices=["auto", "on", "off"], default="auto",
                        help="incremental scoring of one-patch changes (auto: on a CPU)")
    parser.add_argument("--no-whole", dest="whole", action="store_false",
                        help="skip the same search with whole forwards (run when scoring is incremental)")
    parser.add_argument("--cpu-runtime", choices=["auto", "torch", "onnxruntime"], default="auto",
                        help="runtime of the patch-set forwards on a CPU (auto: ONNX Runtime when installed)")
    parser.add_argument("--no-torch", dest="torch", action="store_false",
                        help="skip the same search with PyTorch running the forwards (run when ours uses ONNX Runtime)")
    parser.add_argument("--quick", action="store_true", help="the cat photo, one run, no batch-1 run")
    add_cudnn_flag(parser)
    args = parser.parse_args(argv)
    apply_cudnn_flag(args)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.images, args.repeats, args.unbatched, args.whole, args.torch = ["chelsea"], 1, False, False, False
    return args


def main(argv: list[str] | None = None) -> None:
    from models import ModelRegistry, load_catalog

    args = parse(argv)
    args.busy_at_start = busy()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    info = machine(device)
    model = ModelRegistry(load_catalog(None), str(device)).get("efficientnet_lite0")
    config = SAGConfig(ordering=args.ordering, baseline=args.baseline)
    execution = model.execution.with_policy(incremental=args.incremental, cpu_runtime=args.cpu_runtime)
    first, _ = model.preprocessor.to_input(photo(args.images[0]))
    # warm-up: one whole explanation, so that kernel/primitive set-up for every batch shape
    # (oneDNN on a CPU, cuDNN on CUDA) is not charged to the first photo
    make_sag(model, execution, config).explain(first)
    rows = []
    for name in args.images:
        rows.append(bench_photo(name, model, execution, config, args))
        print(f"{name}: {rows[-1].seconds:.2f} s (first run {rows[-1].first_seconds:.2f} s)", flush=True)
    print(f"\n{info['date']} | {info['machine']} | {info['device']} | {info['versions']}\n")
    print(table(rows, device))
    if not args.no_append:
        append_docs(info, args, config, rows, device)
        print(f"\nwritten to {DOCS}")


if __name__ == "__main__":
    main()
