"""Multi-crop views on the device (Caron et al. 2020, SwAV section 3.2): 2 global + 6 local crops per image.

For 32 px data (32 + 6 x 16) and 96 px data (96 + 6 x 48), checks the views on the chosen device (counts,
sizes, a different local crop for every copy of one image) and prints images/second of the datamodule's
device path, which makes each size in one batched call, next to one ``BatchedViews`` call per view,
and their ratio measured in this one run.
Usage: ``python benchmarks/multicrop_views.py [--device cuda] [--batch-size 512] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.transforms import SimCLRViews

RECIPES = {
    "32px": SimCLRViews(size=32, scale=(0.14, 1.0), num_local=6, local_size=16, local_scale=(0.1, 0.4)),
    "96px": SimCLRViews(size=96, scale=(0.14, 1.0), num_local=6, local_size=48, local_scale=(0.05, 0.14)),
}


def seconds_per_call(fn: Callable[[], object], device: str, repeats: int = 20) -> float:
    """Best of three timings of ``repeats`` calls, after two warm-up calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn(), fn()
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def check(dm: SyntheticData, recipe: SimCLRViews, device: str) -> None:
    """Counts, sizes and per-sample local crops of one image repeated 16 times, on ``device``."""
    image = dm._train.images[:1].to(device).expand(16, -1, -1, -1).contiguous()
    views = dm._device_views({"image": image, "label": torch.zeros(16, dtype=torch.long, device=device)})["views"]
    sizes = [recipe.size] * recipe.num_views + [recipe.local_size] * recipe.num_local
    assert [tuple(v.shape) for v in views] == [(16, 3, s, s) for s in sizes], [v.shape for v in views]
    assert all(v.device.type == device for v in views)
    for view in views[recipe.num_views :]:
        assert len({tuple(v.flatten().tolist()) for v in view.cpu()}) == 16, "identical local crops within a batch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20, help="calls per timing (use a few on a CPU)")
    args = parser.parse_args()
    b, device = args.batch_size, args.device
    for name, recipe in RECIPES.items():
        dm = SyntheticData(num_samples=b, image_size=recipe.size, batch_size=b, num_workers=0, views=recipe)
        dm.setup("fit")
        check(dm, recipe, device)
        batch = {"image": dm._train.images.to(device), "label": dm._train.labels.to(device)}
        generator = torch.Generator(device=device).manual_seed(0)

        def per_view() -> list[torch.Tensor]:
            return [dm._batched_views(batch["image"], generator) for _ in range(recipe.num_views)] + [
                dm._batched_local(batch["image"], generator) for _ in range(recipe.num_local)
            ]

        grouped = seconds_per_call(lambda: dm._device_views(batch), device, args.repeats)
        separate = seconds_per_call(per_view, device, args.repeats)
        print(
            f"{name} {recipe.num_views}x{recipe.size} + {recipe.num_local}x{recipe.local_size}, batch {b} on {device}: "
            f"grouped {b / grouped:,.0f} img/s, one call per view {b / separate:,.0f} img/s, "
            f"ratio {separate / grouped:.2f}x (checks passed)"
        )


if __name__ == "__main__":
    main()
