"""Same-process A/B of this tree against an older commit of the project (issue #19's execution seam).

    python -m bench.seam_ab --baseline /tmp/seam/base            # every method, both photos, 3 rounds
    python -m bench.seam_ab --baseline /tmp/seam/base --rounds 1 --photos chelsea --methods gradcam sag
    python -m bench.seam_ab --baseline DIR --record               # also append a section to docs/benchmarks.md

``--baseline DIR`` is a checkout of an older commit (e.g. ``git worktree add /tmp/seam/base
<commit>``) whose explainers have the API from before the seam: ``GradCAM(module, layer,
fastpath=...)``, ``make_igos(method, module, config)``, ``SAG(module, config, layer=, mean=,
std=)``, ``explain_image(..., options, fastpath)``, settings in ``workers.settings``. Both
versions are imported into this one process: the baseline's packages (``app``, ``explainers``,
``models``, ``workers``) first, with ``DIR`` first on ``sys.path``; their modules are then taken
out of ``sys.modules`` (kept here) and this tree's are imported the same way. Every call into a
version runs with that version's modules back in ``sys.modules`` and its root first on
``sys.path``, since both import parts of themselves lazily, inside functions (SAG's ordering
imports I-GOS when it runs).

What runs, on the CPU, as the service runs it (settings from the environment, ``UNBOX_*``), on
the scikit-image photos chelsea and coffee with efficientnet_lite0: Grad-CAM and Score-CAM (fast
mode, 32 channels) through ``explain_image``; I-GOS and I-GOS++ at the CPU preset; SAG with its
default configuration; the deletion / insertion metrics (50 steps, blurred baseline) of one map
(this tree's Grad-CAM map of the photo) given to both. Each method first runs once per version
untimed (variants, ONNX Runtime sessions and kernels are built there), then ``--rounds`` rounds
alternate old, new, old, new ...; a method's time is the median per photo, averaged over the
photos. Outputs are compared on the last round: CAM maps by correlation (and exact equality),
I-GOS masks bit for bit, SAG roots (patch sets and selection; scores to 1e-6) and graph size,
metric curves (largest difference).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bench.common import DOCS, machine_info, record_section

HERE = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "core", "explainers", "models", "workers")  # core: this tree's only
PHOTOS = ("chelsea", "coffee")
METHODS = ("gradcam", "scorecam", "igos", "igos++", "sag", "metrics")
SCORECAM_CHANNELS = 32


def _ours(name: str) -> bool:
    return name.split(".", 1)[0] in PACKAGES


def _is_tree_path(entry: str) -> bool:
    """Whether a ``sys.path`` entry is the current directory or one of the two trees' roots."""
    return entry in ("", ".") or Path(entry).resolve() == HERE


class Tree:
    """One version of the project's packages, importable on demand into this process."""

    def __init__(self, root: Path, label: str) -> None:
        self.root = root.resolve()
        self.label = label
        self.modules: dict[str, ModuleType] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """This version's modules in ``sys.modules`` and its root first on ``sys.path`` (the other
        version's modules and roots out of the way); what it imports meanwhile is kept."""
        saved = {name: module for name, module in sys.modules.items() if _ours(name)}
        for name in saved:
            del sys.modules[name]
        sys.modules.update(self.modules)
        path = list(sys.path)
        sys.path[:] = [str(self.root)] + [entry for entry in path if not _is_tree_path(entry)
                                          and Path(entry or ".").resolve() != self.root]
        importlib.invalidate_caches()
        try:
            yield
        finally:
            self.modules = {name: module for name, module in sys.modules.items() if _ours(name)}
            for name in self.modules:
                del sys.modules[name]
            sys.modules.update(saved)
            sys.path[:] = path

    def load(self, *names: str) -> list[ModuleType]:
        """Import ``names`` from this tree (checked to come from its root)."""
        with self.active():
            modules = [importlib.import_module(name) for name in names]
        for name, module in self.modules.items():
            file = getattr(module, "__file__", None)
            if file and self.root not in Path(file).resolve().parents:
                raise RuntimeError(f"{self.label}: {name} was imported from {file}, not from {self.root}")
        return modules

    def commit(self) -> str:
        """Short commit of the tree (``+ changes`` when its work tree differs); read-only git."""
        try:
            head = subprocess.run(["git", "-C", str(self.root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(self.root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown commit"
        return head + (" + uncommitted changes" if dirty else "")


def photo(name: str):
    """A scikit-image sample photo (as :func:`bench.sag.photo`)."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


@dataclass
class Side:
    """One version's model and how to run each method with it: ``runs[method](photo) -> output``."""

    tree: Tree
    model: Any
    runs: dict[str, Callable[[str], Any]] = field(default_factory=dict)


Inputs = dict[str, torch.Tensor]  # normalised input per photo (filled once both versions are loaded)
Maps = dict[str, tuple[torch.Tensor, torch.Tensor]]  # (saliency, target) per photo, for the metrics


def old_side(tree: Tree, photos: list[str], inputs: Inputs, maps: Maps) -> Side:
    """The baseline, through its own API (the one before the execution seam)."""
    pipeline, igos, sag, metrics, models, settings = tree.load(
        "explainers.pipeline", "explainers.igos", "explainers.sag", "explainers.metrics", "models",
        "workers.settings")
    with tree.active():
        fast = settings.CoreSettings().fast_path()
        model = models.ModelRegistry(models.load_catalog(None), "cpu").get("efficientnet_lite0")
    images = {name: photo(name) for name in photos}
    side = Side(tree, model)
    side.runs = {
        "gradcam": lambda p: pipeline.explain_image(model, images[p], "gradcam", None, None, 5, 1024, None, fast),
        "scorecam": lambda p: pipeline.explain_image(model, images[p], "scorecam", None, None, 5, 1024,
                                                     {"channels": SCORECAM_CHANNELS}, fast),
        "igos": lambda p: igos.make_igos("igos", model.module, igos.IGOSConfig.cpu_preset("igos")).explain(inputs[p]),
        "igos++": lambda p: igos.make_igos("igos++", model.module,
                                           igos.IGOSConfig.cpu_preset("igos++")).explain(inputs[p]),
        "sag": lambda p: sag.SAG(model.module, sag.SAGConfig(), layer=model.default_layer, mean=model.spec.mean,
                                 std=model.spec.std).explain(inputs[p]),
        "metrics": lambda p: metrics.deletion_insertion(model.module, inputs[p], *maps[p]),
    }
    return side


def new_side(tree: Tree, photos: list[str], inputs: Inputs, maps: Maps) -> Side:
    """This tree, through the method contract (``Method(execution, config, layer, normalization)``)."""
    pipeline, cam, igos, sag, metrics, models, settings = tree.load(
        "explainers.pipeline", "explainers.cam", "explainers.igos", "explainers.sag", "explainers.metrics", "models",
        "core.settings")
    with tree.active():
        policy = settings.CoreSettings().execution_policy()
        model = models.ModelRegistry(models.load_catalog(None), "cpu", policy).get("efficientnet_lite0")
    images = {name: photo(name) for name in photos}
    execution = model.execution
    side = Side(tree, model)
    side.runs = {
        "gradcam": lambda p: pipeline.explain_image(model, images[p], "gradcam", None, None, 5, 1024),
        "scorecam": lambda p: pipeline.explain_image(model, images[p], "scorecam", None, None, 5, 1024,
                                                     cam.ScoreCAMConfig(channels=SCORECAM_CHANNELS)),
        "igos": lambda p: igos.IGOS(execution, igos.IGOSConfig.cpu_preset()).explain(inputs[p]),
        "igos++": lambda p: igos.IGOSPlusPlus(execution, igos.IGOSPlusPlusConfig.cpu_preset()).explain(inputs[p]),
        "sag": lambda p: sag.SAG(execution, sag.SAGConfig(), model.default_layer, model.normalization)
        .explain(inputs[p]),
        "metrics": lambda p: metrics.deletion_insertion(execution, inputs[p], *maps[p]),
    }
    return side


def timed(side: Side, method: str, name: str) -> tuple[Any, float]:
    with side.tree.active():
        started = time.perf_counter()
        output = side.runs[method](name)
        return output, time.perf_counter() - started


# -- output comparisons: (same?, what was compared) ------------------------------------------------
def _cam(old: Any, new: Any) -> tuple[bool, str]:
    a, b = old.explanation.saliency.float().flatten(), new.explanation.saliency.float().flatten()
    if a.shape != b.shape:
        return False, f"map shapes {tuple(old.explanation.saliency.shape)} / {tuple(new.explanation.saliency.shape)}"
    if torch.equal(a, b):
        return True, "maps identical"
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    same_target = int(old.explanation.targets[0]) == int(new.explanation.targets[0])
    return corr >= 0.9999 and same_target, f"map corr {corr:.6f}" + ("" if same_target else ", targets differ")


def _igos(old: Any, new: Any) -> tuple[bool, str]:
    a, b = old.details["mask"], new.details["mask"]
    if a.shape == b.shape and torch.equal(a, b):
        return True, "masks bit-identical"
    difference = float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("nan")
    return False, f"masks differ (max |d| {difference:.2e})"


def _sag(old: Any, new: Any) -> tuple[bool, str]:
    roots_old = [(r.patches, r.selected) for r in old.roots]
    roots_new = [(r.patches, r.selected) for r in new.roots]
    scores = all(abs(a.score - b.score) <= 1e-6 for a, b in zip(old.roots, new.roots))
    graph = (len(old.nodes), len(old.edges)) == (len(new.nodes), len(new.edges))
    same = roots_old == roots_new and scores and graph and old.target == new.target
    text = f"roots {'equal' if roots_old == roots_new else 'differ'} ({len(new.roots)})"
    if not scores and roots_old == roots_new:
        text += ", root scores differ"
    text += f", nodes {len(old.nodes)} / {len(new.nodes)}"
    return same, text


def _metrics(old: Any, new: Any) -> tuple[bool, str]:
    pairs = [(old.deletion_curve, new.deletion_curve), (old.insertion_curve, new.insertion_curve)]
    difference = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
    if difference == 0:
        return True, "curves identical"
    return difference <= 1e-5, f"curves max |d| {difference:.1e}"


COMPARE = {"gradcam": _cam, "scorecam": _cam, "igos": _igos, "igos++": _igos, "sag": _sag, "metrics": _metrics}


@dataclass
class Row:
    method: str
    old_s: float
    new_s: float
    same: bool
    notes: list[str]

    @property
    def ratio(self) -> float:
        return self.new_s / self.old_s


def bench_method(method: str, old: Side, new: Side, photos: list[str], rounds: int) -> Row:
    old_medians, new_medians, same, notes = [], [], True, []
    for name in photos:
        timed(old, method, name)  # untimed: each version builds what it builds on first use
        timed(new, method, name)
        old_times, new_times = [], []
        for _ in range(rounds):
            old_output, seconds = timed(old, method, name)
            old_times.append(seconds)
            new_output, seconds = timed(new, method, name)
            new_times.append(seconds)
        equal, note = COMPARE[method](old_output, new_output)
        same &= equal
        notes.append(f"{name}: {note}")
        old_medians.append(statistics.median(old_times))
        new_medians.append(statistics.median(new_times))
        print(f"{method:9s} {name:8s} old {old_medians[-1]:7.3f} s  new {new_medians[-1]:7.3f} s  {note}", flush=True)
    return Row(method, statistics.fmean(old_medians), statistics.fmean(new_medians), same, notes)


def table(rows: list[Row]) -> str:
    lines = ["| method | old s | new s | ratio (new / old) | same output | compared |", "|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.old_s:.3f} | {r.new_s:.3f} | {r.ratio:.2f} | {'yes' if r.same else 'NO'} | "
                     f"{'; '.join(r.notes)} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.seam_ab", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, type=Path, help="checkout of the older commit (e.g. a git worktree)")
    parser.add_argument("--rounds", type=int, default=3, help="timed old / new pairs per method and photo (median)")
    parser.add_argument("--photos", nargs="+", choices=PHOTOS, default=list(PHOTOS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--record", action="store_true", help="append a dated section to docs/benchmarks.md")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not (args.baseline / "explainers" / "__init__.py").is_file():
        parser.error(f"{args.baseline} holds no explainers package")
    if args.baseline.resolve() == HERE:
        parser.error("--baseline is this tree")
    return args


def versions() -> str:
    import numpy

    try:
        import onnxruntime

        runtime = f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        runtime = "no onnxruntime"
    return f"numpy {numpy.__version__}, {runtime}"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if any(_ours(name) for name in sys.modules):
        raise RuntimeError("the project's packages were imported before the baseline")
    device = torch.device("cpu")
    info = machine_info(device, versions())
    old_tree, new_tree = Tree(args.baseline, "old"), Tree(HERE, "new")
    inputs: Inputs = {}
    maps: Maps = {}
    old = old_side(old_tree, args.photos, inputs, maps)  # the baseline first, then this tree
    new = new_side(new_tree, args.photos, inputs, maps)
    # shared inputs: this tree's preprocessing; for the metrics its Grad-CAM map of the top-1 class
    with new_tree.active():
        for name in args.photos:
            inputs[name] = new.model.preprocessor.to_input(photo(name))[0]
            explanation = new.runs["gradcam"](name).explanation
            maps[name] = (explanation.saliency, explanation.targets)
    with old_tree.active():
        old_inputs = {name: old.model.preprocessor.to_input(photo(name))[0] for name in args.photos}
    old_weights, new_weights = old.model.module.state_dict(), new.model.module.state_dict()
    weights_equal = list(old_weights) == list(new_weights) and all(
        torch.equal(old_weights[key], new_weights[key]) for key in old_weights)
    inputs_equal = all(torch.equal(old_inputs[name], inputs[name]) for name in args.photos)
    print(f"old: {old_tree.root} ({old_tree.commit()}); new: {new_tree.root} ({new_tree.commit()})")
    print(f"same weights: {weights_equal}; same preprocessed inputs: {inputs_equal}; "
          f"{torch.get_num_threads()} torch threads", flush=True)
    rows = [bench_method(method, old, new, args.photos, args.rounds) for method in args.methods]
    print(f"\n{info['date']} | {info['machine']} | {info['versions']}\n")
    print(table(rows))
    if args.record:
        section = (f"\n## Execution seam A/B: this tree vs {old_tree.commit()} ({info['date']})\n\n"
                   f"- command: `python -m bench.seam_ab {' '.join(args.argv)}`\n"
                   f"- machine: {info['machine']}\n- device: {info['device']}\n- versions: {info['versions']}\n"
                   f"- new: {new_tree.commit()}; old: {old_tree.commit()}, both imported into one process; "
                   f"same weights: {weights_equal}, same preprocessed inputs: {inputs_equal}\n"
                   f"- efficientnet_lite0 on {', '.join(args.photos)}, settings from the environment as the service "
                   f"reads them; Grad-CAM and Score-CAM ({SCORECAM_CHANNELS} channels) through explain_image, "
                   f"I-GOS / I-GOS++ CPU preset, SAG default configuration, deletion / insertion (50 steps, blur) "
                   f"of this tree's Grad-CAM map; one untimed run per version first, then {args.rounds} round(s) "
                   f"alternating old / new; s = median per photo, mean over the photos\n\n"
                   f"{table(rows)}\n")
        record_section(section, device)
        print(f"\nwritten to {DOCS}")


if __name__ == "__main__":
    main()
