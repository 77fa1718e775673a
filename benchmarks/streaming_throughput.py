"""Image folder vs LitData streaming on the same JPEG files: images/s per loader worker, and the loader's peak
resident memory at two dataset sizes (the streaming loader's should not grow with the dataset).

Writes a folder of JPEGs (default 2,000 images of 500x375 at quality 90, in 10 classes) and one ``--scale`` times
larger, prepares both with ``ssl-lightning prepare``, then times one epoch of each datamodule's training loader
(SimCLR's 224 px worker crops, as ``fit`` makes them) in a fresh process per measurement, so that peak memory
(``ru_maxrss`` of the process and of its largest worker) belongs to that loader alone. Prints ratios measured in
this one run. Run from the repository root, alone on the machine:

    PYTHONPATH=. python3 benchmarks/streaming_throughput.py [--images 2000] [--scale 4] [--workers 2]
    PYTHONPATH=. python3 benchmarks/streaming_throughput.py --images 40 --size 200x150 --batch-size 8   # a check
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10


def write_jpegs(root: Path, count: int, width: int, height: int, seed: int) -> Path:
    """``count`` smooth random JPEGs (quality 90) in ``CLASSES`` class folders: sizes like photos, not like noise."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class_{i % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def measure(kind: str, location: str, workers: int, batch_size: int) -> dict[str, float]:
    """One epoch of ``kind``'s training loader (after its first batch): images/s, and peak RSS in MiB."""
    from ssl_lightning.datamodules import ImageFolder, StreamingImages
    from ssl_lightning.transforms import SimCLRViews

    views = SimCLRViews(size=224)
    common = {"batch_size": batch_size, "num_workers": workers, "views": views}
    data = ImageFolder(location, **common) if kind == "folder" else StreamingImages(location, **common)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    next(batches)
    start, images, anonymous = time.perf_counter(), 0, anonymous_mib()
    for batch in batches:
        images += batch["label"].shape[0]
        anonymous = max(anonymous, anonymous_mib())
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"images_per_s": images / seconds, "images": images, "rss_mib": own, "worker_rss_mib": worker,
            "anonymous_mib": anonymous}


def anonymous_mib() -> float:
    """This process's resident anonymous memory (``RssAnon``): RSS without file pages, such as the chunk files
    LitData memory-maps in place, which the kernel can drop at any time."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_fresh_process(kind: str, location: str, workers: int, batch_size: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--measure", kind, location, str(workers), str(batch_size)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images of the smaller dataset")
    parser.add_argument("--scale", type=int, default=4, help="the larger dataset has this many times more")
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of every image")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the throughput runs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work-dir", default="/tmp/ssl_lightning_streaming_bench")
    ns = parser.parse_args()
    from ssl_lightning.datamodules.prepared import prepare_folder

    width, height = (int(v) for v in ns.size.split("x"))
    work = Path(ns.work_dir)
    sizes = {"small": ns.images, "large": ns.images * ns.scale}
    for name, count in sizes.items():
        if not (work / name / "prepared").is_dir():
            folder = write_jpegs(work / name / "images" / "train", count, width, height, seed=count)
            prepare_folder(str(folder), str(work / name / "prepared"), num_workers=2, chunk_bytes="64MB")
    locations = {"folder": lambda name: str(work / name / "images"), "streaming": lambda name: str(work / name / "prepared")}

    print(f"{ns.images} and {ns.images * ns.scale} JPEGs of {width}x{height} (quality 90); one epoch each, SimCLR 224 px crops")
    speed = {kind: in_fresh_process(kind, where("small"), ns.workers, ns.batch_size) for kind, where in locations.items()}
    for kind, result in speed.items():
        print(f"  {kind:9s} {result['images_per_s'] / max(1, ns.workers):8.1f} images/s per worker ({ns.workers} workers)")
    print(f"  streaming / folder: {speed['streaming']['images_per_s'] / speed['folder']['images_per_s']:.2f}x")
    print("peak resident memory (MiB) of the loading process, one epoch, no workers: all (anonymous, i.e. without "
          "memory-mapped files)")
    for kind, where in locations.items():
        small, large = (in_fresh_process(kind, where(name), 0, ns.batch_size) for name in sizes)
        print(f"  {kind:9s} {sizes['small']:7d} images: {small['rss_mib']:6.0f} ({small['anonymous_mib']:4.0f})   "
              f"{sizes['large']:7d} images: {large['rss_mib']:6.0f} ({large['anonymous_mib']:4.0f})   growth "
              f"{large['rss_mib'] - small['rss_mib']:+.0f} ({large['anonymous_mib'] - small['anonymous_mib']:+.0f})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        kind, location, workers, batch_size = sys.argv[2:6]
        print(json.dumps(measure(kind, location, int(workers), int(batch_size))))
    else:
        main()
