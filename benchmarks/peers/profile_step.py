"""One side's training step under ``torch.profiler``: the operators it spends its time in, then its images/s over
a few more steps. Run it in each side's environment, alone, to compare what two libraries' steps actually do:

    .venv/bin/python benchmarks/peers/profile_step.py ours byol
    .venv-lightly/bin/python benchmarks/peers/profile_step.py lightly byol      # --width 16 --batch 256 by default
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

SCRIPTS = {"ours": "step_ours", "lightly": "step_lightly", "stable-pretraining": "step_spt"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("side", choices=list(SCRIPTS))
    parser.add_argument("method", choices=["simclr", "simclr_separate", "byol", "moco_v2"])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the profiled ones")
    args = parser.parse_args()
    torch.manual_seed(0)
    build_step = importlib.import_module(SCRIPTS[args.side]).build_step  # benchmarks/peers is this script's folder
    loss_fn, update = build_step(args.method, args.width, args.batch, torch.device("cpu"))
    views = [torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    for _ in range(2):
        update(loss_fn(*views))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(3):
            update(loss_fn(*views))
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    start = time.perf_counter()
    for _ in range(args.steps):
        update(loss_fn(*views))
    print(f"{args.side} {args.method}: {args.steps * args.batch / (time.perf_counter() - start):.1f} img/s "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
