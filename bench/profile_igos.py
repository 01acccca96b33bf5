"""Where an I-GOS / I-GOS++ explanation spends its time: torch.profiler over one run.

    python -m bench.profile_igos                       # I-GOS++ at the reference settings
    python -m bench.profile_igos --method igos --rows 25
    python -m bench.profile_igos --quick               # the CPU preset instead: a smoke run on a CPU

Prints the busiest operators by device time (CUDA) or CPU time, and the wall time of the run
against the summed kernel time: a large gap means launch overhead or host syncs, not arithmetic.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.igos import load_images
from explainers.registry import create, method_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["igos", "igos++"], default="igos++")
    parser.add_argument("--image", default="chelsea")
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the method's CPU preset instead of the reference settings")
    args = parser.parse_args()

    from models import ModelRegistry, load_catalog

    device = torch.device(args.device)
    model = ModelRegistry(load_catalog(None), str(device)).get("efficientnet_lite0")
    inputs, _ = model.preprocessor.to_input(load_images([args.image])[args.image])
    target = int(model.logits(inputs)[0].argmax())
    kind = method_class(args.method)  # its Config's defaults are the reference settings
    explainer = create(args.method, model.execution, kind.Config.cpu_preset() if args.quick else None)
    explainer.explain(inputs, target)  # warm-up
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        result = explainer.explain(inputs, target)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    events = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) if cuda else 0
    print(f"wall {wall:.3f} s under the profiler; summed device self time {device_us / 1e6:.3f} s; "
          f"images {result.details['images_evaluated']}; precision {result.details['precision']}")


if __name__ == "__main__":
    main()
