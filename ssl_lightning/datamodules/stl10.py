"""STL-10 (Coates et al. 2011): pretrain on the 100,000 unlabeled + 5,000 train images (96x96);
the kNN bank is the labeled train split and evaluation uses the 8,000 test images."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets

from ssl_lightning.datamodules.base import SSLDataModule, TensorImages

STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)


class STL10(SSLDataModule):
    """STL-10 through torchvision; ``download=true`` fetches it in ``prepare_data``."""

    num_classes = 10
    default_image_size = 96
    mean, std = STL10_MEAN, STL10_STD

    def __init__(self, root: str = "data", download: bool = False, **kwargs) -> None:
        self.root, self.download = Path(root), download
        super().__init__(**kwargs)

    def prepare_data(self) -> None:
        if self.download:
            datasets.STL10(str(self.root), split="train+unlabeled", download=True)

    def _split(self, split: str) -> TensorImages:
        try:
            data = datasets.STL10(str(self.root), split=split, download=False)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"STL-10 not found under {self.root.resolve()} ({err}); set data.init_args.download=true"
            ) from err
        return TensorImages(torch.from_numpy(data.data), torch.from_numpy(data.labels).long())

    def train_source(self) -> Dataset:
        return ConcatDataset([self._split("unlabeled"), self._split("train")])

    def bank_source(self) -> Dataset:
        return self._split("train")

    def val_source(self) -> Dataset:
        return self._split("test")
