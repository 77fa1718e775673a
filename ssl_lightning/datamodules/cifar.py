"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) through torchvision, held in memory as uint8 tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import datasets

from ssl_lightning.datamodules.base import CIFAR10_CLASSES, SSLDataModule, TensorImages

CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class _TorchvisionCIFAR(SSLDataModule):
    dataset_class: type[datasets.CIFAR10] = datasets.CIFAR10

    def __init__(self, root: str = "data", download: bool = False, **kwargs) -> None:
        self.root, self.download = Path(root), download
        super().__init__(**kwargs)

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self.dataset_class(str(self.root), train=train, download=True)

    def _split(self, train: bool) -> TensorImages:
        try:
            data = self.dataset_class(str(self.root), train=train, download=False)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{self.dataset_class.__name__} not found under {self.root.resolve()} ({err}); "
                "set data.init_args.download=true or point data.init_args.root at it"
            ) from err
        images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
        return TensorImages(images, torch.tensor(data.targets))

    def train_source(self) -> Dataset:
        return self._split(train=True)

    def val_source(self) -> Dataset:
        return self._split(train=False)


class CIFAR10(_TorchvisionCIFAR):
    """CIFAR-10: 50,000 training and 10,000 test images of 10 classes, 32x32."""

    num_classes = 10
    classes = CIFAR10_CLASSES


class CIFAR100(_TorchvisionCIFAR):
    """CIFAR-100: 50,000 training and 10,000 test images of 100 classes, 32x32."""

    dataset_class = datasets.CIFAR100
    num_classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD
