"""A datamodule of one image repeated, for tests of the views on the three view paths."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ssl_lightning.datamodules.base import SSLDataModule, TensorImages

VIEW_PATHS = {"argnames": "fixed_size, on_device", "argvalues": [(True, False), (True, True), (False, True)],
              "ids": ["workers", "device", "worker_crops"]}


class RepeatedImage(SSLDataModule):
    """``count`` copies of ``image`` (uint8 (3, H, W)), no labels; ``fixed_size=False`` crops in workers."""

    def __init__(self, image: torch.Tensor, count: int, fixed_size: bool, **kwargs) -> None:
        self.image, self.count, self.fixed_size = image, count, fixed_size
        super().__init__(**kwargs)

    def train_source(self) -> Dataset:
        return TensorImages(self.image.expand(self.count, -1, -1, -1).contiguous(), torch.full((self.count,), -1))
