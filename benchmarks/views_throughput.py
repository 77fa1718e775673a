"""Throughput of two SimCLR views per image (Chen et al. 2020, appendix A recipe) at 32 px (no blur: the
recipe blurs only images of at least ``blur_min_size`` = 96 px) and at 96 px with blur (p = 0.5):

(a) torchvision v2 per sample in DataLoader workers (``--workers``, default 2: all cores of the dev machine),
(b) ``BatchedViews`` eager, (c) ``BatchedViews`` with its elementwise stages compiled (``compile_views``),
(d) kornia's batched pipeline (32 px only, no blur), when installed.

Prints images/second (two views each) and the ratios measured in this one run.
Usage: ``python benchmarks/views_throughput.py [--device cuda] [--threads 2] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from ssl_lightning.datamodules.base import TensorImages, ViewsDataset
from ssl_lightning.transforms import SimCLRViews


def seconds(run: Callable[[], object], device: str, repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls (after one warm-up call)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def per_sample_rate(recipe: SimCLRViews, data: torch.Tensor, workers: int, batch_size: int) -> float:
    """Two views per image in ``workers`` DataLoader processes, as the worker path makes them."""
    dataset = ViewsDataset(TensorImages(data, torch.full((len(data),), -1)), recipe.per_sample_views())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0)
    return len(data) / seconds(lambda: sum(1 for _ in loader), "cpu")


def batched_rate(recipe: SimCLRViews, batches: list[torch.Tensor], device: str, compile: bool) -> float:
    views = recipe.batched(compile)
    generator = torch.Generator(device=device).manual_seed(0)

    def run() -> None:
        for batch in batches:
            views(batch.repeat(2, 1, 1, 1), generator, views=2)  # both views in one call, as the datamodule

    return sum(len(b) for b in batches) / seconds(run, device)


def kornia_rate(recipe: SimCLRViews, batches: list[torch.Tensor], device: str) -> float | None:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    r = recipe
    pipeline = torch.nn.Sequential(
        K.RandomResizedCrop((r.size, r.size), scale=r.scale, ratio=r.ratio),
        K.RandomHorizontalFlip(p=r.hflip_p),
        K.ColorJitter(r.brightness, r.contrast, r.saturation, r.hue, p=r.jitter_p),
        K.RandomGrayscale(p=r.grayscale_p),
        K.Normalize(torch.tensor(r.mean), torch.tensor(r.std)),
    ).to(device)

    def run() -> None:
        for batch in batches:
            x = batch.float() / 255
            pipeline(x), pipeline(x)

    return sum(len(b) for b in batches) / seconds(run, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", help="device of the batched paths")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the batched paths")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-sample path")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, nargs=2, default=(4096, 1024), help="images at 32 and 96 px")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"two views per image; batched on {args.device} with {args.threads} thread(s); per sample in "
          f"{args.workers} worker(s); batch {args.batch_size}")
    for size, count in zip((32, 96), args.images):
        recipe = SimCLRViews(size=size)  # blur (p = 0.5) from 96 px
        data = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        batches = [b.to(args.device) for b in data.split(args.batch_size)]
        per_sample = per_sample_rate(recipe, data, args.workers, args.batch_size)
        eager = batched_rate(recipe, batches, args.device, compile=False)
        compiled = batched_rate(recipe, batches, args.device, compile=True)
        blur = "with blur" if recipe.blurs else "no blur"
        print(f"{size} px ({blur}): (a) per sample {per_sample:8.0f} img/s | (b) batched {eager:8.0f} img/s | "
              f"(c) batched, compiled {compiled:8.0f} img/s")
        print(f"{size} px: batched / per sample {eager / per_sample:5.1f}x, compiled / per sample "
              f"{compiled / per_sample:5.1f}x, compiled / eager {compiled / eager:4.1f}x")
        if size == 32:
            kornia = kornia_rate(recipe, batches, args.device)
            if kornia is not None:
                print(f"32 px: (d) kornia batched {kornia:8.0f} img/s; batched, compiled / kornia {compiled / kornia:4.1f}x")


if __name__ == "__main__":
    main()
