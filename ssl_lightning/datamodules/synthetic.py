"""Synthetic images for tests and smoke runs: each class is a fixed random colour pattern plus noise."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ssl_lightning.datamodules.base import SSLDataModule, TensorImages


def make_synthetic_images(num_samples: int, image_size: int, num_classes: int, seed: int) -> TensorImages:
    """Images of ``num_classes`` classes that a linear model on pixels can tell apart."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, image_size, image_size, generator=g) * 255
    labels = torch.arange(num_samples) % num_classes
    noise = torch.randn(num_samples, 3, image_size, image_size, generator=g) * 30
    images = (patterns[labels] + noise).clamp(0, 255).to(torch.uint8)
    return TensorImages(images, labels)


class SyntheticData(SSLDataModule):
    """Random class-pattern images; ``labeled=False`` drops the labels (and the validation split)."""

    def __init__(
        self,
        num_samples: int = 256,
        num_val_samples: int = 64,
        image_size: int = 32,
        num_classes: int = 10,
        labeled: bool = True,
        **kwargs,
    ) -> None:
        self.default_image_size = image_size
        self.num_classes = num_classes if labeled else None
        self.num_samples, self.num_val_samples, self.labeled = num_samples, num_val_samples, labeled
        self._classes = num_classes
        super().__init__(**kwargs)

    def train_source(self) -> Dataset:
        data = make_synthetic_images(self.num_samples, self.default_image_size, self._classes, seed=self.seed)
        if not self.labeled:
            data.labels = torch.full_like(data.labels, -1)
        return data

    def val_source(self) -> Dataset | None:
        if not self.labeled:
            return None
        return make_synthetic_images(self.num_val_samples, self.default_image_size, self._classes, seed=self.seed + 1)
