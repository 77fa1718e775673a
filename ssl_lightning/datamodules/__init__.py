"""LightningDataModules that yield batches of views (see ``base.SSLDataModule``)."""

from ssl_lightning.datamodules.base import SSLDataModule
from ssl_lightning.datamodules.bundled import BundledCIFAR10
from ssl_lightning.datamodules.cifar import CIFAR10, CIFAR100
from ssl_lightning.datamodules.image_folder import ImageFolder
from ssl_lightning.datamodules.stl10 import STL10
from ssl_lightning.datamodules.streaming import StreamingImages
from ssl_lightning.datamodules.synthetic import SyntheticData
from ssl_lightning.datamodules.text import BundledText, TextData

__all__ = ["SSLDataModule", "BundledCIFAR10", "CIFAR10", "CIFAR100", "ImageFolder", "STL10", "StreamingImages", "SyntheticData", "TextData", "BundledText"]
