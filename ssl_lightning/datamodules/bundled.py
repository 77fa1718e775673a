"""The CIFAR-10 subset shipped inside the package: 5,000 train and 1,000 test images, works offline."""

from __future__ import annotations

from functools import cached_property
from importlib import resources

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import decode_jpeg

from ssl_lightning.datamodules.base import CIFAR10_CLASSES, SSLDataModule, TensorImages

ASSET = "cifar10_subset.npz"


def _decode_split(arrays: np.lib.npyio.NpzFile, split: str) -> TensorImages:
    blob = torch.from_numpy(arrays[f"{split}_jpeg"])
    offsets = arrays[f"{split}_offsets"].tolist()
    images = decode_jpeg([blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])])
    return TensorImages(torch.stack(images), torch.from_numpy(arrays[f"{split}_labels"]))


class BundledCIFAR10(SSLDataModule):
    """A balanced CIFAR-10 subset bundled with the package (see ``assets/README.md``)."""

    num_classes = 10
    classes = CIFAR10_CLASSES

    @cached_property
    def _splits(self) -> dict[str, TensorImages]:
        with resources.files(__package__).joinpath("assets", ASSET).open("rb") as handle:
            arrays = np.load(handle)
            return {split: _decode_split(arrays, split) for split in ("train", "test")}

    def train_source(self) -> Dataset:
        return self._splits["train"]

    def val_source(self) -> Dataset:
        return self._splits["test"]
