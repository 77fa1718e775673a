"""Any folder of images, ImageNet-style: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``,
or ``root/train/*.jpg`` with no labels at all. Grayscale, palette and RGBA images are converted to RGB."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from ssl_lightning.datamodules.base import IMAGENET_MEAN, IMAGENET_STD, SSLDataModule

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
        with Image.open(path) as image:
            return pil_to_tensor(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot be read as an image ({err})") from err


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
    """

    fixed_size = False
    default_image_size = 224
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, root: str, train_dir: str = "train", val_dir: str = "val", **kwargs) -> None:
        self.root = Path(root)
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
