"""Throughput of two SimCLR 32x32 views per image (Chen et al. 2020, appendix A recipe):
(a) torchvision v2 per sample in a loop, (b) ``BatchedViews``, (c) kornia's batched pipeline (no
blur on any path: the recipe blurs only images of at least ``blur_min_size`` = 96 pixels).

Prints images/second (two views each) and the ratios measured in this one run.
Usage: ``python benchmarks/views_throughput.py [--device cuda] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from ssl_lightning.transforms import SimCLRViews

RECIPE = SimCLRViews(size=32)


def images_per_second(make_views: Callable[[torch.Tensor], object], batches: list[torch.Tensor], device: str) -> float:
    """Best of three passes over ``batches`` (after one warm-up batch)."""
    make_views(batches[0])
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            make_views(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return sum(len(b) for b in batches) / best


def per_sample_rate(data: torch.Tensor) -> float:
    transform = RECIPE.per_sample()

    def views(batch: torch.Tensor) -> None:
        for image in batch:
            transform(image), transform(image)

    return images_per_second(views, [data], "cpu")


def batched_rate(batches: list[torch.Tensor], device: str) -> float:
    views = RECIPE.batched()
    generator = torch.Generator(device=device).manual_seed(0)
    return images_per_second(lambda x: (views(x, generator), views(x, generator)), batches, device)


def kornia_rate(batches: list[torch.Tensor], device: str) -> float | None:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    r = RECIPE
    pipeline = torch.nn.Sequential(
        K.RandomResizedCrop((r.size, r.size), scale=r.scale, ratio=r.ratio),
        K.RandomHorizontalFlip(p=r.hflip_p),
        K.ColorJitter(r.brightness, r.contrast, r.saturation, r.hue, p=r.jitter_p),
        K.RandomGrayscale(p=r.grayscale_p),
        K.Normalize(torch.tensor(r.mean), torch.tensor(r.std)),
    ).to(device)

    def views(x: torch.Tensor) -> None:
        x = x.float() / 255
        pipeline(x), pipeline(x)

    return images_per_second(views, batches, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", help="device of the batched paths (b) and (c)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-sample-images", type=int, default=1000, help="the slow loop sees fewer images")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    seed = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=seed)
    batches = [b.to(args.device) for b in data.split(args.batch_size)]

    print(f"two SimCLR 32x32 views per image; batched paths on {args.device} with {args.threads} CPU thread(s)")
    torch.set_num_threads(1)
    per_sample = per_sample_rate(data[: args.per_sample_images])
    torch.set_num_threads(args.threads)
    print(f"(a) torchvision v2 per sample, 1 thread: {per_sample:10.0f} img/s")
    batched = batched_rate(batches, args.device)
    print(f"(b) BatchedViews:                        {batched:10.0f} img/s")
    kornia = kornia_rate(batches, args.device)
    if kornia is None:
        print("(c) kornia: not installed")
    else:
        print(f"(c) kornia batched:                      {kornia:10.0f} img/s")
    print(f"batched / per-sample: {batched / per_sample:6.1f}x")
    if kornia is not None:
        print(f"batched / kornia:     {batched / kornia:6.1f}x")


if __name__ == "__main__":
    main()
