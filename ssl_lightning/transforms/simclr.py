"""The SimCLR view recipe (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", appendix A), as per-sample torchvision v2 transforms.

The same recipe runs batched on the device through :class:`~ssl_lightning.transforms.batched.BatchedViews`
(``SimCLRViews.batched()``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torchvision.transforms import v2

if TYPE_CHECKING:
    from ssl_lightning.transforms.batched import BatchedViews

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"{name} must be a (low, high) pair with low <= high, got {value!r}")
    return values  # type: ignore[return-value]


def _triple(name: str, value: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must have one value per RGB channel, got {value!r}")
    return values  # type: ignore[return-value]


def blur_kernel_size(size: int) -> int:
    """Gaussian blur kernel size: 10% of the image side, made odd (SimCLR appendix A)."""
    return int(0.1 * size) // 2 * 2 + 1


@dataclass
class SimCLRViews:
    """SimCLR augmentation recipe (Chen et al. 2020, appendix A): random resized crop, horizontal flip,
    colour jitter (p=0.8, strength 0.4/0.4/0.4/0.1), random grayscale (p=0.2) and Gaussian blur
    (p=0.5, sigma in [0.1, 2], kernel 10% of the side; skipped on small images such as CIFAR).

    ``num_views`` views are made per image; with the probabilities at 0 the same class describes the
    light single-view augmentation of pretext tasks and masked modelling (crop and flip only)."""

    size: int = 32
    num_views: int = 2
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_min_size: int = 96
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"size must be a positive integer, got {self.size!r}")
        if int(self.num_views) != self.num_views or self.num_views < 1:
            raise ValueError(f"num_views must be a positive integer, got {self.num_views!r}")
        if int(self.blur_min_size) != self.blur_min_size or self.blur_min_size < 1:
            raise ValueError(f"blur_min_size must be a positive integer, got {self.blur_min_size!r}")
        self.scale = _pair("scale", self.scale)
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"scale must lie in (0, 1], got {self.scale}")
        self.ratio = _pair("ratio", self.ratio)
        if self.ratio[0] <= 0.0:
            raise ValueError(f"ratio must be positive, got {self.ratio}")
        self.blur_sigma = _pair("blur_sigma", self.blur_sigma)
        if self.blur_sigma[0] <= 0.0:
            raise ValueError(f"blur_sigma must be positive, got {self.blur_sigma}")
        for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability and must lie in [0, 1], got {getattr(self, name)!r}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5], got {self.hue!r}")
        self.mean = _triple("mean", self.mean)
        self.std = _triple("std", self.std)
        if min(self.std) <= 0.0:
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def blurs(self) -> bool:
        """Whether the recipe blurs: only for images of at least ``blur_min_size`` pixels."""
        return self.size >= self.blur_min_size and self.blur_p > 0.0

    def per_sample(self) -> v2.Compose:
        """One view of ONE uint8 (3, H, W) image -> float32 normalized (3, size, size).

        Call it once per view; meant for DataLoader workers (each call draws its own parameters).
        """
        ops: list[Callable] = [
            v2.RandomResizedCrop(self.size, scale=self.scale, ratio=self.ratio, antialias=True),
            v2.RandomHorizontalFlip(self.hflip_p),
            v2.RandomApply(
                [v2.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue)], p=self.jitter_p
            ),
            v2.RandomGrayscale(self.grayscale_p),  # keeps 3 channels on RGB input
        ]
        if self.blurs:
            ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(self.size), self.blur_sigma)], p=self.blur_p))
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(ops)

    def worker_crop(self) -> v2.Compose:
        """Only the random resized crop, uint8 -> uint8 (3, size, size), for variable-size images.

        The rest of the recipe then runs on the device with ``batched()(images, generator, crop=False)``.
        """
        return v2.Compose(
            [
                v2.RandomResizedCrop(self.size, scale=self.scale, ratio=self.ratio, antialias=True),
                v2.ToDtype(torch.uint8, scale=True),
            ]
        )

    def batched(self) -> BatchedViews:
        """The same recipe on a whole uint8 batch on its device, parameters drawn per sample."""
        from ssl_lightning.transforms.batched import BatchedViews

        return BatchedViews(self)


def eval_transform(
    size: int, mean: Sequence[float], std: Sequence[float], resize: int | None = None
) -> v2.Compose:
    """Evaluation view of one uint8 (3, H, W) image: resize the shorter side to ``resize`` (default
    ``size``; a no-op when it already matches), centre crop ``size``, scale to float and normalize."""
    return v2.Compose(
        [
            v2.Resize(resize or size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
