"""JPEGs decoded on the device vs in DataLoader workers: images/s of two SimCLR views each (224 px by default).

Writes a seeded folder of JPEGs (default 2,000 of 500x375 at quality 90, ImageNet-sized) into a temporary folder and
times one epoch of each path after its first batch, all in this one run:

(a) the per-sample worker path: decode, crop and the whole recipe in ``--workers`` DataLoader workers
    (``ImageFolder(views_on_device=False)``);
(b) workers read the files' bytes only; decoding (``torchvision.io.decode_jpeg`` on a list: nvJPEG on CUDA), crops and
    the recipe run batched on ``--device`` (``ImageFolder(decode_on_device=True)``);
(c) for reference, today's device path for images of any size: decode and crop in workers, the rest on the device.

The batch is moved as Lightning moves it and made into views by the datamodule's own hook. Prints images/s and the
ratios (b)/(a), (c)/(a). Run from the repository root, alone on the machine:

    PYTHONPATH=. python benchmarks/jpeg_decode.py                       # all cores as workers, cuda when available
    PYTHONPATH=. python benchmarks/jpeg_decode.py --images 24 --batch-size 8 --workers 1 --size 96   # a check
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from benchmarks.streaming_throughput import write_jpegs
from ssl_lightning.datamodules import ImageFolder
from ssl_lightning.transforms import SimCLRViews

PATHS = {
    "workers": "(a) per-sample views in workers",
    "decode_on_device": "(b) bytes in workers, decode + views on the device",
    "crops_in_workers": "(c) decode + crops in workers, rest on the device",
}


def images_per_second(path: str, root: str, device: torch.device, workers: int, batch_size: int, size: int) -> float:
    """One epoch of ``path``'s training batches made into views (after the first batch)."""
    data = ImageFolder(root, batch_size=batch_size, num_workers=workers, views=SimCLRViews(size=size),
                       views_on_device=path != "workers", decode_on_device=path == "decode_on_device")
    data.setup("fit")
    batches, images = iter(data.train_dataloader()), 0
    for index, batch in enumerate(batches):
        batch = move_data_to_device(batch, device)
        views = data._device_views(batch)["views"] if data.views_on_device else batch["views"]
        if index == 0:  # workers started, decoder and kernels warm
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        else:
            images += views[0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", default="500x375", help="WIDTHxHEIGHT of every JPEG")
    parser.add_argument("--size", type=int, default=224, help="view size (px)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ns = parser.parse_args()
    width, height = (int(v) for v in ns.image_size.split("x"))
    device = torch.device(ns.device)
    with tempfile.TemporaryDirectory() as work:
        write_jpegs(Path(work) / "train", ns.images, width, height, seed=0)
        print(f"{ns.images} JPEGs of {width}x{height} (quality 90), two {ns.size} px SimCLR views each, batch "
              f"{ns.batch_size}, {ns.workers} workers, device {device}")
        speed = {}
        for path, label in PATHS.items():
            speed[path] = images_per_second(path, work, device, ns.workers, ns.batch_size, ns.size)
            print(f"  {label:52s} {speed[path]:9.1f} images/s")
    print(f"  (b) / (a): {speed['decode_on_device'] / speed['workers']:.2f}x   "
          f"(c) / (a): {speed['crops_in_workers'] / speed['workers']:.2f}x")


if __name__ == "__main__":
    main()
