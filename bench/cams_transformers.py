"""The CAM family on Vision Transformers and Swin: ours against pytorch-grad-cam.

    python -m bench.cams_transformers              # full run (CPU: see below), appends to docs/benchmarks.md
    python -m bench.cams_transformers --quick      # 64-px input, one repeat, no append: checks that it runs
    python -m bench.cams_transformers --scorecam-models vit_small_patch16_224 swin_t vit_b_16   # adds ViT-B

Methods: Grad-CAM, Score-CAM (exact: every channel), Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM
and Eigen-CAM (``explainers.registry`` names; pytorch-grad-cam's GradCAM, ScoreCAM,
GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM, EigenCAM). Models, all with **random weights**
(nothing is downloaded; fine for timing, not for judging what the maps show), each explained at
our default layer (:func:`models.default_layers.default_layer`):

- torchvision ``vit_b_16`` (``encoder.layers.encoder_layer_11.ln_1``, class token + 14 x 14
  patch tokens; its head and class token start at zero, so they are randomised, as in
  tests/test_transformers.py: a zero head has no gradient at all),
- timm ``vit_small_patch16_224`` (``blocks.11.norm1``, 384 channels),
- torchvision ``swin_t`` (``features.7.1.norm2``, channels last ``B x 7 x 7 x 768``),
- timm ``swin_tiny_patch4_window7_224`` (``layers.3.blocks.1.norm2``).

pytorch-grad-cam gets the ``reshape_transform`` its tutorials give per family, written by hand
from the model's facts (prefix tokens dropped and the rest put on the patch grid; channels-last
maps permuted), and its own copy of the module with parameters that require grad. Maps are
compared at input resolution, ours upsampled bilinearly (half-pixel centres) as
tests/test_cams_parity.py does. The target is the same for both: with random weights the top-1's
Grad-CAM can be all negative (an empty map compares nothing), so it is the first of the top-5
classes whose Grad-CAM (ours) is not empty, as in tests/test_transformers.py.

Eigen-CAM's sign: an SVD's singular vectors are defined up to sign; pytorch-grad-cam's
``EigenCAM`` keeps numpy's, ours flips the projection when ``|min| > |max|`` (the rule of
``get_2d_projection_with_sign_correction``). The correlation reported is against that
sign-corrected projection of the very activations the timed reference captured (ReLU, resized as
the reference resizes); the note says whether numpy's sign agreed and the correlation with the
plain reference map (meaningless, near -1 or 0, when the signs differ).

Score-CAM runs one forward per channel in pytorch-grad-cam (768 full forwards of ViT-B: minutes
on 2 cores), so on the CPU it runs by default on the small ViT (384 channels) and torchvision's
Swin-T (768 channels) only, once each (``--scorecam-repeats``, ours and the reference alike);
``--quick`` keeps the small ViT only (Swin-T's 768 forwards take minutes even at 64 px);
``--scorecam-models`` adds ``vit_b_16`` or the timm Swin. On CUDA it runs on every model by
default. How long a run takes is in docs/benchmarks.md with its results.

Ours runs with the execution the service uses (``Execution(module, ExecutionPolicy())``: exact
fp32 on a CPU; on CUDA fp16 autocast + channels_last + CUDA graphs, as bench/cams.py). Timings are
medians of ``--repeats`` runs after one warm-up run (none for Score-CAM on the CPU, as in
bench/cams.py); on CUDA every run is synchronised.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Callable

import numpy as np
import torch
from torch import nn

from bench.cams import (Row, add_execution_options, add_run_options, correlation, prepare, sample_input, table,
                        timed)
from bench.common import DOCS, machine_info, record_section
from explainers.cam import ScoreCAMConfig
from explainers.execution import Execution, ExecutionPolicy
from explainers.registry import create
from models.default_layers import default_layer

# name: (library, architecture, options for an input of ``size`` pixels)
MODELS: dict[str, tuple[str, str, Callable[[int], dict[str, object]]]] = {
    "vit_b_16": ("torchvision", "vit_b_16", lambda size: {"image_size": size}),
    "vit_small_patch16_224": ("timm", "vit_small_patch16_224", lambda size: {"img_size": size}),
    "swin_t": ("torchvision", "swin_t", lambda size: {}),
    "swin_tiny_patch4_window7_224": ("timm", "swin_tiny_patch4_window7_224", lambda size: {"img_size": size}),
}
# the layers the literature (and pytorch-grad-cam's tutorials) use: our defaults must be these
EXPECTED_LAYERS = {
    "vit_b_16": "encoder.layers.encoder_layer_11.ln_1",
    "vit_small_patch16_224": "blocks.11.norm1",
    "swin_t": "features.7.1.norm2",
    "swin_tiny_patch4_window7_224": "layers.3.blocks.1.norm2",
}
METHODS = ["gradcam", "scorecam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam"]
SCORECAM_MODELS = ["vit_small_patch16_224", "swin_t"]


def load_model(name: str, size: int, device: torch.device) -> nn.Module:
    """``name`` with fixed random weights; parameters that start at zero (torchvision ViT's head
    and class token) drawn from N(0, 0.02), or Grad-CAM would have no gradient at all."""
    library, architecture, options = MODELS[name]
    torch.manual_seed(0)
    if library == "torchvision":
        import torchvision

        module = torchvision.models.get_model(architecture, weights=None, num_classes=1000, **options(size))
    else:
        import timm

        module = timm.create_model(architecture, pretrained=False, num_classes=1000, **options(size))
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, 0.02)
    return module.eval().requires_grad_(False).to(device)


def reshape_transform_for(module: nn.Module, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """pytorch-grad-cam's reshape for the family (its ViT / DeiT / Swin tutorials), by hand:
    tokens minus the prefix tokens on the grid (patch grid for ViTs, last stage for Swin), or
    channels-last maps permuted to channels first."""
    prefix = getattr(module, "num_prefix_tokens", 1 if hasattr(module, "class_token") else 0)
    side = size // (32 if "swin" in type(module).__name__.lower() else 16)

    def reshape(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4:
            return tensor.permute(0, 3, 1, 2)
        grid = tensor[:, prefix:, :].reshape(tensor.size(0), side, side, tensor.size(2))
        return grid.permute(0, 3, 1, 2)

    return reshape


def reference_classes() -> dict[str, type]:
    import pytorch_grad_cam as ref

    return {"gradcam": ref.GradCAM, "scorecam": ref.ScoreCAM, "gradcam++": ref.GradCAMPlusPlus,
            "xgradcam": ref.XGradCAM, "layercam": ref.LayerCAM, "hirescam": ref.HiResCAM, "eigencam": ref.EigenCAM}


def reference_cam(method: str, module: nn.Module, layer: str, size: int, batch_size: int):
    twin = copy.deepcopy(module).requires_grad_(True)  # it needs parameters that require grad
    cam = reference_classes()[method](model=twin, target_layers=[twin.get_submodule(layer)],
                                      reshape_transform=reshape_transform_for(module, size))
    if method == "scorecam":
        cam.batch_size = batch_size
    return cam


def sign_corrected_reference(cam, size: int) -> tuple[np.ndarray, bool]:
    """The sign-corrected projection (ReLU, scaled and resized as the reference does) of the
    activations the reference EigenCAM captured on its last call, and whether numpy's sign
    already satisfied the correction rule."""
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection, get_2d_projection_with_sign_correction

    activations = cam.activations_and_grads.activations[0].cpu().numpy()
    corrected = scale_cam_image(np.maximum(get_2d_projection_with_sign_correction(activations), 0), (size, size))
    raw = get_2d_projection(activations)
    agrees = bool(np.all(np.abs(raw.min(axis=(1, 2))) <= np.abs(raw.max(axis=(1, 2)))))
    return corrected, agrees


def choose_target(execution: Execution, layer: str, inputs: torch.Tensor, logits: torch.Tensor) -> tuple[int, int]:
    """(target, rank): the first of the top-5 classes whose Grad-CAM (ours) is not empty."""
    gradcam = create("gradcam", execution, layer=layer)
    top = logits[0].topk(5).indices.tolist()
    for rank, target in enumerate(top):
        if float(gradcam.explain(inputs, target).saliency.max()) > 0:
            return target, rank
    return top[0], 0


def ours_note(details: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in details.items() if k != "total_channels")


def bench_model(name: str, methods: list[str], args: argparse.Namespace, device: torch.device,
                policy: ExecutionPolicy) -> tuple[list[Row], str]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = load_model(name, args.size, device)
    layer = default_layer(module, args.size)
    if layer != EXPECTED_LAYERS[name]:
        print(f"{name}: our default layer is {layer}, not {EXPECTED_LAYERS[name]}", file=sys.stderr, flush=True)
    assert layer is not None, f"no default layer for {name}"
    execution = Execution(module, policy.with_changes(memory_budget_mb=args.memory_mb))
    inputs = sample_input(args.size, device)
    with torch.inference_mode():
        logits = module(inputs)
    target, rank = choose_target(execution, layer, inputs, logits)
    targets = [ClassifierOutputTarget(target)]
    rows = []
    for method in methods:
        if method == "scorecam" and name not in args.scorecam_models:
            continue
        ours = create(method, execution, ScoreCAMConfig() if method == "scorecam" else None, layer=layer)
        # Score-CAM on the CPU runs for tens of seconds per call: no warm-up run (nothing to compile)
        warmup = device.type == "cuda" or method != "scorecam"
        repeats = args.scorecam_repeats if method == "scorecam" else args.repeats
        ours_ms, explanation = timed(lambda: ours.explain(inputs, target), repeats, device, warmup)
        notes = [ours_note(explanation.details)]
        reference_ms = corr = None
        if not args.no_reference:
            cam = reference_cam(method, module, layer, args.size, args.reference_batch)
            chosen = None if method == "eigencam" else targets  # class-agnostic: the reference takes none
            reference_ms, maps = timed(lambda: cam(inputs, targets=chosen), repeats, device, warmup)
            if method == "eigencam":
                corrected, agrees = sign_corrected_reference(cam, args.size)
                corr = correlation(explanation.saliency, corrected)
                plain = correlation(explanation.saliency, maps)
                notes.append(f"corr vs the reference's sign-corrected projection; numpy's sign "
                             f"{'agreed' if agrees else 'DIFFERED'}, corr vs plain EigenCAM {plain:.4f}")
            else:
                corr = correlation(explanation.saliency, maps)
                if not float(np.max(maps)) > 0:
                    notes.append("reference map empty: corr meaningless")
        rows.append(Row(name, method, ours_ms, reference_ms, "pytorch-grad-cam", corr,
                        "; ".join(note for note in notes if note)))
        print(f"  {name} {method}: ours {ours_ms:.1f} ms, reference "
              f"{'-' if reference_ms is None else f'{reference_ms:.1f}'} ms", flush=True)
    return rows, f"{name}: `{layer}`, target {target} (top-{rank + 1})"


def machine(device: torch.device) -> dict[str, str]:
    from importlib.metadata import version

    import timm
    import torchvision

    return machine_info(device, f"torchvision {torchvision.__version__}, timm {timm.__version__}, "
                                f"grad-cam {version('grad-cam')}")


def findings(rows: list[Row]) -> list[str]:
    """The rows to look at: ours slower than the reference, maps that disagree."""
    lines = []
    for r in rows:
        if r.ratio is not None and r.ratio < 1:
            lines.append(f"- {r.model} {r.method}: ours slower than pytorch-grad-cam (ratio {r.ratio:.2f})")
        if r.correlation is not None and not r.correlation >= 0.99:
            lines.append(f"- {r.model} {r.method}: map correlation {r.correlation:.4f} < 0.99")
    return lines or ["- every method at least as fast as pytorch-grad-cam, every map correlation >= 0.99"]


def notes_table(rows: list[Row]) -> str:
    """bench/cams.py's table; its last column carries our notes, not only how ours ran."""
    head, *rest = table(rows).split("\n", 1)
    return "\n".join([head.replace("| ours ran |", "| note |"), *rest])


def append_docs(info: dict[str, str], args: argparse.Namespace, rows: list[Row], layers: list[str]) -> None:
    mode = "quick check (not a measurement)" if args.quick else "full run"
    section = (f"\n## CAMs on Transformers: ours vs pytorch-grad-cam ({info['date']}, {mode})\n\n"
               f"- command: `python -m bench.cams_transformers {' '.join(args.argv)}`\n"
               f"- machine: {info['machine']}\n- device: {info['device']}\n- versions: {info['versions']}\n"
               f"- models: random weights (no downloads: fine for timing, not for what the maps show); "
               f"layer and target per model: {'; '.join(layers)}\n"
               f"- input: cat photo at {args.size} x {args.size}, target = the first of the top-5 whose Grad-CAM "
               f"is not empty, median of {args.repeats} (Score-CAM, ours and pytorch-grad-cam's: "
               f"{args.scorecam_repeats}; pytorch-grad-cam's Score-CAM batch {args.reference_batch}); one warm-up "
               f"run first except for Score-CAM on the CPU; Score-CAM exact on {', '.join(args.scorecam_models)}\n"
               f"- map corr: at input resolution, ours upsampled bilinearly; Eigen-CAM against the "
               f"sign-corrected projection of the reference's activations (see the note)\n"
               f"- ours: {args.fast}\n\n"
               f"{notes_table(rows)}\n\n" + "\n".join(findings(rows)) + "\n")
    record_section(section, args.device_used)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cams_transformers", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--scorecam-models", nargs="+", choices=list(MODELS), default=None,
                        help="models Score-CAM runs on (exact; pytorch-grad-cam: one forward per channel); "
                        f"default on CUDA every model, on the CPU {' '.join(SCORECAM_MODELS)} "
                        f"({SCORECAM_MODELS[0]} only with --quick)")
    add_run_options(parser)
    parser.add_argument("--scorecam-repeats", type=int, default=None,
                        help="repeats of Score-CAM, ours and pytorch-grad-cam's "
                        "(default: 1 on CPU, --repeats on CUDA)")
    parser.add_argument("--reference-batch", type=int, default=16,
                        help="pytorch-grad-cam Score-CAM batch (its default)")
    add_execution_options(parser)
    parser.add_argument("--quick", action="store_true", help="64-px input, one repeat, no append: a smoke run")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.size, args.repeats, args.no_append = 64, 1, True
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device, policy = prepare(args)
    if args.scorecam_models is None:  # CPU: Swin-T's 768 masked forwards take minutes even at 64 px
        args.scorecam_models = (SCORECAM_MODELS[:1] if args.quick else list(SCORECAM_MODELS)) \
            if device.type != "cuda" else list(args.models)
    if args.scorecam_repeats is None:
        args.scorecam_repeats = args.repeats if device.type == "cuda" else 1
    info = machine(device)
    rows: list[Row] = []
    layers: list[str] = []
    for name in args.models:
        model_rows, layer = bench_model(name, args.methods, args, device, policy)
        rows.extend(model_rows)
        layers.append(layer)
        print(f"{layer}: done", flush=True)
    print(f"\n{info['date']} | {info['machine']} | {info['device']} | {info['versions']}\n")
    print(notes_table(rows))
    print("\n".join(findings(rows)))
    if not args.no_append:
        append_docs(info, args, rows, layers)
        print(f"\nwritten to {DOCS}")


if __name__ == "__main__":
    main()
