"""bf16-mixed against float32 training steps on the CPU: SimCLR (and BYOL / MoCo v2) on CIFAR ResNet-18s through
Lightning's ``fit``, the two precisions taking turns for a few rounds; prints the median images/s of each and
their ratio, after the rate of a plain matrix product in each dtype. On CPUs with AMX (Intel Xeon 4th generation and later: ``amx_bf16`` in /proc/cpuinfo) oneDNN runs bf16
convolutions and matrix products on the tile units; without AMX or AVX-512 bf16, bf16 is usually slower.

    PYTHONPATH=. python benchmarks/cpu_precision.py                         # widths 8, 32, 64; a few minutes
    PYTHONPATH=. python benchmarks/cpu_precision.py --widths 8 --rounds 1 --steps 2 --warmup 1   # smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.gpu_step_table import METHODS, images_per_second

PRECISIONS = ("32-true", "bf16-mixed")


def cpu_description() -> str:
    """The CPU's model name and whether it has AMX tiles for bf16."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {torch.get_num_threads()} threads, amx_bf16: {'yes' if ' amx_bf16' in info else 'no'}"


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """The rate of a ``size`` x ``size`` matrix product in ``dtype`` (after three untimed ones)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["simclr"], choices=list(METHODS))
    parser.add_argument("--widths", nargs="+", type=int, default=[8, 32, 64])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="turns of each precision")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per turn")
    args = parser.parse_args()
    print(f"{cpu_description()}, torch {torch.__version__}, batch {args.batch}, {args.rounds} rounds of "
          f"{args.steps} timed steps after {args.warmup}")
    fp32_rate, bf16_rate = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(f"2048x2048 matrix product: float32 {fp32_rate:,.0f} GFLOP/s, bfloat16 {bf16_rate:,.0f} GFLOP/s "
          f"({bf16_rate / fp32_rate:.1f}x)")
    print("method  | width | 32-true img/s | bf16-mixed img/s | bf16 / fp32")
    for method in args.methods:
        for width in args.widths:
            speeds: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
            for _ in range(args.rounds):
                for precision in PRECISIONS:
                    run = argparse.Namespace(device="cpu", precision=precision, width=width, batch=args.batch,
                                             warmup=args.warmup, steps=args.steps)
                    speeds[precision].append(images_per_second(method, run, "eager"))
            fp32, bf16 = (statistics.median(speeds[precision]) for precision in PRECISIONS)
            print(f"{method:7s} | {width:5d} | {fp32:13,.1f} | {bf16:16,.1f} | {bf16 / fp32:10.2f}x", flush=True)


if __name__ == "__main__":
    main()
