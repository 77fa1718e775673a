"""Cut the bundled CIFAR-10 subset (500 train + 100 test images per class) from JPEG image folders.

Usage: python scripts/make_bundled_cifar10.py ../shared/data/cifar10 ssl_lightning/datamodules/assets/cifar10_subset.npz

The JPEG bytes are stored unchanged (no re-encoding), concatenated per split, in a compressed ``.npz``.
"""

from __future__ import annotations

import argparse
import random
import tarfile
import tempfile
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pick(split_dir: Path, per_class: int, rng: random.Random) -> tuple[list[bytes], list[int]]:
    blobs, labels = [], []
    for label, name in enumerate(CLASSES):
        files = sorted((split_dir / name).glob("*.jpg"))
        if len(files) < per_class:
            raise ValueError(f"{split_dir / name}: {len(files)} images, need {per_class}")
        for path in sorted(rng.sample(files, per_class)):
            blobs.append(path.read_bytes())
            labels.append(label)
    return blobs, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path, help="folder with train.tar.gz and test.tar.gz")
    parser.add_argument("output", type=Path)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    arrays: dict[str, np.ndarray] = {"classes": np.array(CLASSES)}
    with tempfile.TemporaryDirectory() as tmp:
        for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
            with tarfile.open(args.source / f"{split}.tar.gz") as tar:
                tar.extractall(tmp, filter="data")
            blobs, labels = _pick(Path(tmp) / split, per_class, rng)
            arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
            arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
            arrays[f"{split}_labels"] = np.array(labels, dtype=np.int64)
    np.savez_compressed(args.output, **arrays)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
