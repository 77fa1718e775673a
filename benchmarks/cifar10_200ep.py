"""200 CIFAR-10 epochs in minutes (issue 13, item 2): SimCLR, CIFAR ResNet-18 (width 64), batch 512, 200 epochs
on the full CIFAR-10 (the JPEG folders of ``../shared/data/cifar10``, decoded once into memory so every view op
runs on the device), then weighted kNN top-1 with k = 200 (T = 0.1) on the 10,000 test images, as lightly's
published table (SimCLR 0.848 at batch 512 and 200 epochs). Target: at least that in at most 6 minutes on one
H200. Prints the wall time of ``fit``, img/s and kNN top-1 before and after.

    PYTHONPATH=. python benchmarks/cifar10_200ep.py --data ../shared/data/cifar10            # one GPU
    PYTHONPATH=. python benchmarks/cifar10_200ep.py --data ../shared/data/cifar10 --device cpu --epochs 1 \\
        --width 8 --limit 2048 --precision 32-true                                          # CPU smoke run
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import Dataset
from torchvision.io import decode_jpeg, read_file

from ssl_lightning.callbacks import KNNMonitor
from ssl_lightning.datamodules.base import CIFAR10_CLASSES, SSLDataModule, TensorImages
from ssl_lightning.methods import SimCLR
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews


def load_split(archive: Path, limit: int | None) -> TensorImages:
    """Every JPEG of ``<split>.tar.gz`` (``<split>/<class>/*.jpg``) as one uint8 tensor with its labels."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        files = sorted(Path(tmp).glob("*/*/*.jpg"))
        if limit is not None:
            chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:limit].sort().values
            files = [files[i] for i in chosen.tolist()]
        images = torch.stack(decode_jpeg([read_file(str(f)) for f in files]))
    labels = torch.tensor([CIFAR10_CLASSES.index(f.parent.name) for f in files])
    return TensorImages(images, labels)


class CIFAR10InMemory(SSLDataModule):
    """CIFAR-10 from its JPEG folders, decoded once: whole uint8 images, every view op on the device."""

    num_classes, classes = 10, CIFAR10_CLASSES

    def __init__(self, root: Path, limit: int | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.limit = root, limit

    def train_source(self) -> Dataset:
        return load_split(self.root / "train.tar.gz", self.limit)

    def val_source(self) -> Dataset:
        return load_split(self.root / "test.tar.gz", None if self.limit is None else self.limit // 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with train.tar.gz and test.tar.gz")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--limit", type=int, default=None, help="training images (a smoke run); test: limit / 5")
    args = parser.parse_args()
    for archive in ("train.tar.gz", "test.tar.gz"):
        if not (args.data / archive).is_file():
            raise SystemExit(f"{args.data / archive}: not found (expected CIFAR-10's JPEG archives, see its README)")
    seed_everything(0, verbose=False)
    model = SimCLR(backbone="cifar_resnet18", backbone_kwargs={"base_width": args.width}, temperature=0.5,
                   projection_hidden_dim=2048, compile_backbone=args.compile,
                   optim=OptimConfig(name="lars", lr=1.0, weight_decay=1e-6, warmup_epochs=10))
    views = SimCLRViews(size=32, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    data = CIFAR10InMemory(args.data, args.limit, batch_size=args.batch, num_workers=0, views=views,
                           compile_views=args.compile)
    knn = KNNMonitor(every_n_epochs=args.epochs, k=200, temperature=0.1, print_summary=False)
    trainer = Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision,
                      max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=args.epochs,
                      callbacks=[knn])
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    images = trainer.global_step * args.batch
    print(f"SimCLR CIFAR-10, ResNet-18 width {args.width}, batch {args.batch}, {args.epochs} epochs, {args.precision}: "
          f"fit {seconds:.0f} s ({images / seconds:,.0f} img/s incl. kNN and start-up), "
          f"knn_top1 (k=200) before={knn.before:.2f} after={knn.after:.2f}; target >= 84.8 in <= 360 s")


if __name__ == "__main__":
    main()
