"""What routing around oneDNN#6035 costs: a CIFAR ResNet-18's forward and backward (CPU, fp32, channels-last input)
with every 1x1 strided shortcut subsampled (``SubsampledPointwiseConv2d``, ``ssl_lightning.nn.memory_format``)
against the same network channels-last as is and contiguous. At base width 16 and above no shortcut is narrower
than oneDNN's channel block, so the network as is computes correct gradients to compare with. Interleaved rounds,
median; prints the time ratios.

    python benchmarks/narrow_shortcuts.py [--width 16] [--batch 128] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.nn.memory_format import SubsampledPointwiseConv2d, is_strided_pointwise, to_channels_last


def seconds_per_step(network: nn.Module, images: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        network(images).square().sum().backward()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.width < 16:
        parser.error(f"--width {args.width}: below 16 the network as is hits the oneDNN bug; use 16 or more")

    base = build_backbone("cifar_resnet18", base_width=args.width)
    networks = {
        "subsampled": to_channels_last(copy.deepcopy(base), subsample=is_strided_pointwise),
        "channels-last as is": copy.deepcopy(base).to(memory_format=torch.channels_last),
        "contiguous": copy.deepcopy(base),
    }
    replaced = sum(isinstance(m, SubsampledPointwiseConv2d) for m in networks["subsampled"].modules())
    images = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for network in networks.values():
        seconds_per_step(network, images, 1)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in networks}
    for _ in range(args.rounds):
        for name, network in networks.items():
            times[name].append(seconds_per_step(network, images, args.steps))
    median = {name: statistics.median(values) for name, values in times.items()}

    print(f"{platform.machine()}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"cifar_resnet18 width {args.width}, batch {args.batch}, fp32; {replaced} shortcuts subsampled; "
          f"median of {args.rounds} rounds of {args.steps} steps")
    for name, value in median.items():
        print(f"  {name:22s} {1000 * value:8.1f} ms per forward + backward")
    for name in ("channels-last as is", "contiguous"):
        print(f"subsampled / {name}: {median['subsampled'] / median[name]:.3f} (time)")


if __name__ == "__main__":
    main()
