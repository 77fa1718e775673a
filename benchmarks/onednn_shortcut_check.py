"""Does this CPU show oneDNN#6035 (``ssl_lightning/nn/memory_format.py``)? CIFAR ResNet-18s made channels-last with a
bare ``.to(memory_format=torch.channels_last)`` (no subsampled shortcuts), in eval mode, against the float64 contiguous
network: the worst relative error of the downsampling shortcuts' weight gradients over 3 batches, per dtype, width
and thread count, and for bf16 the contiguous bf16 network's error beside it. Each case runs in its own process (the
bug can abort or hang one); an exit code or timeout is printed in place of the error.

    python benchmarks/onednn_shortcut_check.py            # float32 and bfloat16, widths 4 8 16 32, 1 and 2 threads
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch


def shortcut_error(dtype: torch.dtype, width: int, channels_last: bool) -> float:
    from ssl_lightning.backbones import build_backbone

    torch.manual_seed(0)
    reference = build_backbone("cifar_resnet18", base_width=width).eval().double()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    tested = build_backbone("cifar_resnet18", base_width=width).eval().to(dtype).to(memory_format=layout)
    tested.load_state_dict(reference.state_dict())
    worst = 0.0
    for _ in range(3):
        images = torch.randn(32, 3, 32, 32)
        for network, batch in ((reference, images.double()), (tested, images.to(dtype).contiguous(memory_format=layout))):
            network.zero_grad()
            network(batch).float().square().sum().backward()
        for (name, expected), actual in zip(reference.named_parameters(), tested.parameters()):
            if "downsample.0" in name:
                worst = max(worst, float((actual.grad.double() - expected.grad).norm() / expected.grad.norm()))
    return worst


def in_subprocess(dtype: str, width: int, threads: int, channels_last: bool) -> str:
    command = [sys.executable, __file__, "--case", dtype, str(width), "cl" if channels_last else "contiguous"]
    try:
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "timeout (hang)"
    return f"{float(done.stdout):.1e}" if done.returncode == 0 else f"exit code {done.returncode}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # one case, in a subprocess
    parser.add_argument("--widths", nargs="+", type=int, default=[4, 8, 16, 32])
    args = parser.parse_args()
    if args.case:
        dtype, width, layout = args.case
        print(shortcut_error(getattr(torch, dtype), int(width), layout == "cl"))
        return
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("dtype    | width | threads | channels-last error | contiguous error")
    for dtype in ("float32", "bfloat16"):
        for width in args.widths:
            for threads in (1, 2):
                contiguous = in_subprocess(dtype, width, threads, False) if dtype == "bfloat16" else "-"
                print(f"{dtype:8s} | {width:5d} | {threads:7d} | {in_subprocess(dtype, width, threads, True):>19s} | "
                      f"{contiguous:>16s}", flush=True)


if __name__ == "__main__":
    main()
