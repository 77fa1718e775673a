"""Any folder of images, ImageNet-style: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``,
or ``root/train/*.jpg`` with no labels at all. Grayscale, palette and RGBA images are converted to RGB."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Dataset

from ssl_lightning.datamodules.base import IMAGENET_MEAN, IMAGENET_STD, SSLDataModule
from ssl_lightning.datamodules.encoded import EncodedFiles, decode_on_device, decode_rgb
from ssl_lightning.distributed import is_distributed, rank, world_size

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _check_image_file(path: Path) -> None:
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"{path}: not an image file (extensions read: {', '.join(sorted(IMAGE_EXTENSIONS))})")


def scan_folder(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels (-1 when unlabeled) and class names of one split folder; fails on anything odd."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {split_dir}")
    entries = sorted(p for p in split_dir.iterdir() if _visible(p))
    dirs, files = [p for p in entries if p.is_dir()], [p for p in entries if not p.is_dir()]
    if dirs and files:
        raise ValueError(f"{split_dir}: mixes class folders and loose files ({files[0].name}); use one layout")
    if files:  # unlabeled: images directly in the split folder
        for path in files:
            _check_image_file(path)
        return files, [-1] * len(files), []
    if not dirs:
        raise ValueError(f"{split_dir}: no images and no class folders")
    paths, labels = [], []
    for label, class_dir in enumerate(dirs):
        class_files = sorted(p for p in class_dir.rglob("*") if _visible(p) and not p.is_dir())
        if not class_files:
            raise ValueError(f"{class_dir}: empty class folder")
        for path in class_files:
            _check_image_file(path)
        paths += class_files
        labels += [label] * len(class_files)
    return paths, labels, [d.name for d in dirs]


def load_rgb(path: Path) -> torch.Tensor:
    """Decode an image file to a uint8 (3, H, W) tensor; errors name the file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot be read as an image ({err})") from err
    return decode_rgb(data, str(path))


def unreadable_files(paths: Sequence[Path], threads: int = 1) -> dict[Path, str]:
    """Decode every file of ``paths`` once (as training would); ``{path: "path: reason"}`` of those that fail,
    in the order of ``paths``. Under DDP each rank decodes its share and all ranks get the whole answer."""
    def failure(path: Path) -> Optional[str]:
        try:
            load_rgb(path)
        except ValueError as err:
            return str(err)
        return None

    mine = paths[rank() :: world_size()]
    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes without the GIL
        found = {path: reason for path, reason in zip(mine, pool.map(failure, mine)) if reason is not None}
    if is_distributed():
        parts: list[dict[Path, str]] = [{} for _ in range(world_size())]
        dist.all_gather_object(parts, found)
        found = {path: reason for part in parts for path, reason in part.items()}
    return {path: found[path] for path in paths if path in found}


class ImageFiles(Dataset):
    """``(uint8 image, label)`` read from files on access."""

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return load_rgb(self.paths[index]), self.labels[index]


class ImageFolder(SSLDataModule):
    """Images of any size: random crops are made in workers, the rest of the recipe where chosen.

    Args:
        root: folder holding ``train/`` and, for evaluation, ``val/`` (class sub-folders in both).
        verify_images: decode every file once in ``setup``, before training, and fail with one error that lists
            every unreadable file (otherwise a corrupt file is found only when the loader reaches it).
        skip_unreadable: decode every file once in ``setup`` and leave the unreadable ones out, with a warning
            giving how many and which (``skipped_files`` holds them).
        decode_on_device: (with ``views_on_device``) workers only read the training files; JPEGs are decoded as
            one batch on the device (nvJPEG on a GPU), then cropped and made into views there. Files the device
            decoder cannot take (PNG, CMYK or progressive JPEGs) are decoded in the workers instead, and their
            number per epoch is logged once (``cpu_decodes``: {epoch: count} on this process).
    """

    fixed_size = False
    default_image_size = 224
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        verify_images: bool = False,
        skip_unreadable: bool = False,
        decode_on_device: bool = False,
        **kwargs,
    ) -> None:
        if decode_on_device and not kwargs.get("views_on_device", True):
            raise ValueError("decode_on_device: true needs views_on_device: true (views are made where images are decoded)")
        self.decode_on_device = decode_on_device
        self.cpu_decodes: dict[int, int] = {}
        self._reported: set[int] = set()
        self.root = Path(root)
        self.verify_images, self.skip_unreadable = verify_images, skip_unreadable
        self.skipped_files: Optional[list[Path]] = None  # set once the files are checked
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root not found: {self.root}")
        self.train_files, self.train_labels, self.classes = scan_folder(self.root / train_dir)
        self.num_classes = len(self.classes) or None
        self.val_files: Optional[list[Path]] = None
        if self.num_classes is not None and (self.root / val_dir).exists():
            self.val_files, self.val_labels, val_classes = scan_folder(self.root / val_dir)
            if val_classes != self.classes:
                raise ValueError(f"{self.root / val_dir}: class folders {val_classes[:5]}... differ from {train_dir}/")
        super().__init__(**kwargs)

    def train_source(self) -> Dataset:
        return ImageFiles(self.train_files, self.train_labels)

    def val_source(self) -> Optional[Dataset]:
        return None if self.val_files is None else ImageFiles(self.val_files, self.val_labels)

    def encoded_train_source(self) -> Optional[Dataset]:
        return EncodedFiles(self.train_files, self.train_labels) if self.decode_on_device else None

    def decode_images(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        indices = batch["index"].tolist()
        images, on_cpu = decode_on_device(
            batch["data"], batch["label"].device, lambda i: f"training item {indices[i]} -> {self.train_files[indices[i]]}"
        )
        epoch = 0 if self.trainer is None else self.trainer.current_epoch
        if epoch not in self.cpu_decodes:
            self._report_cpu_decodes()  # the previous epoch's
        self.cpu_decodes[epoch] = self.cpu_decodes.get(epoch, 0) + on_cpu
        return images

    def teardown(self, stage: str) -> None:
        self._report_cpu_decodes()
        super().teardown(stage)

    def _report_cpu_decodes(self) -> None:
        """Log once how many files the latest epoch decoded on the CPU rather than the device."""
        if self.cpu_decodes and max(self.cpu_decodes) not in self._reported:
            epoch = max(self.cpu_decodes)
            self._reported.add(epoch)
            if self.cpu_decodes[epoch]:
                rank_zero_info(f"epoch {epoch}: {self.cpu_decodes[epoch]} training image file(s) were decoded on the CPU, "
                               "not the device (PNG, CMYK or progressive JPEGs, or JPEGs the device decoder refused)")

    def setup(self, stage: str) -> None:
        if (self.verify_images or self.skip_unreadable) and self.skipped_files is None:
            self._check_files()
        super().setup(stage)

    def _check_files(self) -> None:
        """Decode every training and validation file; fail listing the unreadable ones, or leave them out."""
        bad = unreadable_files(self.train_files + (self.val_files or []), self.num_workers)
        if bad and not self.skip_unreadable:
            raise ValueError(
                f"{len(bad)} unreadable image file(s) under {self.root} (fix or remove them, or set "
                "data.init_args.skip_unreadable: true to train without them):\n  " + "\n  ".join(bad.values())
            )
        if bad:
            rank_zero_warn(f"skipping {len(bad)} unreadable image file(s) under {self.root}:\n  " + "\n  ".join(bad.values()))
        self.train_files, self.train_labels = _without(bad, self.train_files, self.train_labels)
        if self.val_files is not None:
            self.val_files, self.val_labels = _without(bad, self.val_files, self.val_labels)
        self.skipped_files = list(bad)


def _without(bad: dict[Path, str], paths: list[Path], labels: list[int]) -> tuple[list[Path], list[int]]:
    """``paths`` and their ``labels`` without the files in ``bad``."""
    kept = [(path, label) for path, label in zip(paths, labels) if path not in bad]
    return [path for path, _ in kept], [label for _, label in kept]
