"""The SimCLR view recipe (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", appendix A), as per-sample torchvision v2 transforms, optionally with the low-resolution
local crops of multi-crop (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments", SwAV, section 3.2) and with per-view probabilities for asymmetric recipes such as
BYOL's (Grill et al. 2020, "Bootstrap Your Own Latent", table 6: blur 1.0 / 0.1, solarization 0 / 0.2).

The same recipe runs batched on the device through :class:`~ssl_lightning.transforms.batched.BatchedViews`
(``SimCLRViews.batched()``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ssl_lightning.transforms.batched import PER_VIEW_FIELDS, SOLARIZE_THRESHOLD, BatchedViews, blur_kernel_size

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



@dataclasses.dataclass
class SimCLRViews:
    """SimCLR augmentation recipe (Chen et al. 2020, appendix A): random resized crop, horizontal flip,
    colour jitter (p=0.8, strength 0.4/0.4/0.4/0.1), random grayscale (p=0.2) and Gaussian blur
    (p=0.5, sigma in [0.1, 2], kernel 10% of the side; skipped on small images such as CIFAR), then
    solarization (p=0 here; pixels >= 128 of 255 inverted, as BYOL's).

    ``per_view`` gives each global view its own probabilities (the fields in ``PER_VIEW_FIELDS``), one
    mapping per view, e.g. BYOL's ``[{blur_p: 1.0}, {blur_p: 0.1, solarize_p: 0.2}]``; unnamed fields and
    the local crops keep the recipe's values.

    ``num_views`` views are made per image; with the probabilities at 0 the same class describes the
    light single-view augmentation of pretext tasks and masked modelling (crop and flip only).

    Multi-crop (Caron et al. 2020, SwAV section 3.2): ``num_views`` GLOBAL views at ``size``/``scale``
    followed by ``num_local`` LOCAL views at ``local_size``/``local_scale``, the rest of the recipe
    unchanged (the blur rule applies per size). Recipes used by the papers and suggested here:

    - SwAV, ImageNet: ``size: 224, scale: [0.14, 1], num_local: 6, local_size: 96, local_scale: [0.05, 0.14]``.
    - DINO, ImageNet: ``size: 224, scale: [0.4, 1]`` (``[0.32, 1]`` for its small ViTs), ``num_local`` 6-10,
      ``local_size: 96, local_scale: [0.05, 0.4]`` (resp. ``[0.05, 0.32]``).
    - 96 px data (STL-10): ``size: 96, scale: [0.14, 1], local_size: 48, local_scale: [0.05, 0.14]``: the
      ImageNet geometry at 96/224 of the pixels; a 5% crop still holds about 21x21 source pixels.
    - 32 px data (CIFAR): ``size: 32, scale: [0.14, 1], local_size: 16, local_scale: [0.1, 0.4]``. The
      ImageNet range would cut 7x7 to 12x12 pixel patches, upsampled about 2x: likely too little of a
      32 px object to match a global view. 10-40% gives 10x10 to 20x20 patches at about one source pixel
      per output pixel, still well under a global view's content; 16 px leaves 2x2 cells after the CIFAR
      ResNet's 8x downsampling. These 32/96 px settings are reasoned, not tuned here.
    """

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
    solarize_p: float = 0.0
    per_view: tuple[dict[str, float], ...] = ()
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    num_local: int = 0
    local_size: int = 0
    local_scale: tuple[float, float] = (0.05, 0.14)

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"size must be a positive integer, got {self.size!r}")
        if int(self.num_views) != self.num_views or self.num_views < 1:
            raise ValueError(f"num_views must be a positive integer, got {self.num_views!r}")
        if int(self.num_local) != self.num_local or self.num_local < 0:
            raise ValueError(f"num_local must be a non-negative integer, got {self.num_local!r}")
        if int(self.local_size) != self.local_size or self.local_size < 0:
            raise ValueError(f"local_size must be a non-negative integer, got {self.local_size!r}")
        if self.num_local > 0 and self.local_size == 0:
            raise ValueError(f"local_size must be set (> 0) when num_local={self.num_local} local crops are asked for")
        self.local_scale = _pair("local_scale", self.local_scale)
        if not 0.0 < self.local_scale[0] <= self.local_scale[1] <= 1.0:
            raise ValueError(f"local_scale must lie in (0, 1], got {self.local_scale}")
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
        for name in PER_VIEW_FIELDS:
            _check_probability(name, getattr(self, name))
        self.per_view = tuple(dict(view) for view in self.per_view)
        if self.per_view and len(self.per_view) != self.num_views:
            raise ValueError(f"per_view has {len(self.per_view)} entries for num_views={self.num_views} global views: "
                             "give one mapping per global view")
        for i, view in enumerate(self.per_view):
            for name, value in view.items():
                if name not in PER_VIEW_FIELDS:
                    raise ValueError(f"per_view[{i}] sets {name!r}; a view may only set {', '.join(PER_VIEW_FIELDS)}")
                _check_probability(f"per_view[{i}].{name}", value)
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
    def total_views(self) -> int:
        """Views per image: ``num_views`` global views followed by ``num_local`` local views."""
        return self.num_views + self.num_local

    def local_views(self) -> SimCLRViews:
        """The recipe of the local crops alone: ``num_local`` views at ``local_size``/``local_scale``
        (the recipe's own probabilities: ``per_view`` is for the global views)."""
        if self.num_local == 0:
            raise ValueError("local_views() needs num_local > 0; this recipe has no local crops")
        return dataclasses.replace(
            self, size=self.local_size, scale=self.local_scale, num_views=self.num_local, num_local=0, local_size=0,
            per_view=(),
        )

    def view(self, index: int) -> SimCLRViews:
        """The recipe of global view ``index`` alone: one view with its ``per_view`` probabilities."""
        if not 0 <= index < self.num_views:
            raise ValueError(f"view index {index} is out of range for num_views={self.num_views}")
        overrides = self.per_view[index] if self.per_view else {}
        return dataclasses.replace(self, **overrides, num_views=1, num_local=0, local_size=0, per_view=())

    def view_probabilities(self, name: str) -> tuple[float, ...]:
        """The probability ``name`` (one of ``PER_VIEW_FIELDS``) of each global view, in view order."""
        return tuple(float(getattr(self.view(i), name)) for i in range(self.num_views))

    @property
    def blurs(self) -> bool:
        """Whether some view blurs: only images of at least ``blur_min_size`` pixels are blurred."""
        return self.size >= self.blur_min_size and max(self.view_probabilities("blur_p")) > 0.0

    @property
    def solarizes(self) -> bool:
        """Whether some view is solarized."""
        return max(self.view_probabilities("solarize_p")) > 0.0

    def _photometric(self) -> list[Callable]:
        """Colour jitter, grayscale, blur and solarization of a uint8 crop, then scaling and normalization."""
        ops: list[Callable] = [
            v2.RandomApply(
                [v2.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue)], p=self.jitter_p
            ),
            v2.RandomGrayscale(self.grayscale_p),  # keeps 3 channels on RGB input
        ]
        if self.blurs:
            ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(self.size), self.blur_sigma)], p=self.blur_p))
        if self.solarizes:
            ops.append(v2.RandomSolarize(SOLARIZE_THRESHOLD, p=self.solarize_p))
        return ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def per_sample(self) -> v2.Compose:
        """One view of ONE uint8 (3, H, W) image -> float32 normalized (3, size, size), with the first
        view's probabilities (``per_sample_views()`` gives each view its own).

        Call it once per view; meant for DataLoader workers (each call draws its own parameters).
        """
        first = self.view(0)
        return v2.Compose(
            [
                v2.RandomResizedCrop(self.size, scale=self.scale, ratio=self.ratio, antialias=True),
                v2.RandomHorizontalFlip(first.hflip_p),
                *first._photometric(),
            ]
        )

    def per_sample_views(self) -> list[CroppedView]:
        """One per-sample transform per view, global views first: ``total_views`` callables, each
        returning ``(view, box)`` (see ``CroppedView``)."""
        local = [self.local_views().view(0)] * self.num_local if self.num_local else []
        recipes = [self.view(i) for i in range(self.num_views)] + local
        return [CroppedView(r, r.hflip_p, v2.Compose(r._photometric())) for r in recipes]

    def worker_crop(self) -> CroppedView:
        """Only the random resized crop, uint8 -> ``(uint8 (3, size, size), box)``, for variable-size images.

        The rest of the recipe then runs on the device with ``batched()(images, generator, crop=False)``.
        """
        return CroppedView(self, 0.0, v2.ToDtype(torch.uint8, scale=True))

    def worker_crops(self) -> list[CroppedView]:
        """One ``worker_crop()`` per view, global views first (local ones at ``local_size``/``local_scale``)."""
        local = [self.local_views().worker_crop()] * self.num_local if self.num_local else []
        return [self.worker_crop()] * self.num_views + local

    def batched(self, compile: bool = False) -> BatchedViews:
        """The same recipe on a whole uint8 batch on its device, parameters drawn per sample (the global
        views; ``local_views().batched()`` makes the local ones); ``compile``: its elementwise stages
        through ``torch.compile``."""
        return BatchedViews(self, compile)


class CroppedView:
    """A random resized crop of ONE uint8 (3, H, W) image, flipped with probability ``hflip_p``, then
    ``rest``; returns ``(rest(crop), box)`` with ``box`` = (top, left, height, width, flipped) as float32,
    the crop's place in fractions of the image's height and width (the batch contract's ``boxes``)."""

    def __init__(self, recipe: SimCLRViews, hflip_p: float, rest: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.crop = v2.RandomResizedCrop(recipe.size, scale=recipe.scale, ratio=recipe.ratio, antialias=True)
        self.size, self.hflip_p, self.rest = recipe.size, hflip_p, rest

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        box = self.crop.make_params([image])
        crop = TF.resized_crop(image, **box, size=[self.size, self.size], antialias=True)
        flipped = bool(torch.rand(()) < self.hflip_p)
        if flipped:
            crop = TF.horizontal_flip(crop)
        height, width = image.shape[-2:]
        place = (box["top"] / height, box["left"] / width, box["height"] / height, box["width"] / width)
        return self.rest(crop), torch.tensor([*place, float(flipped)], dtype=torch.float32)


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a probability and must lie in [0, 1], got {value!r}")


def eval_transform(
    size: int | None, mean: Sequence[float], std: Sequence[float], resize: int | None = None
) -> v2.Compose:
    """Evaluation view of one uint8 (3, H, W) image: resize the shorter side to ``resize`` (None: keep the
    size), centre crop ``size`` (None: no crop), scale to float and normalize. With neither, the pixels are
    only scaled and normalized. An image smaller than the crop is an error, not zero-padded."""
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = [] if resize is None else [v2.Resize(resize, antialias=True)]
    if size is not None:
        steps += [_AtLeast(size), v2.CenterCrop(size)]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


class _AtLeast:
    """Refuse an image smaller than the centre crop (``CenterCrop`` would pad it with zeros)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if min(image.shape[-2:]) < self.size:
            raise ValueError(f"a {image.shape[-2]}x{image.shape[-1]} image is smaller than the {self.size} px centre "
                             "crop of evaluation: set the data's eval_resize, or eval_crop (or views.size) smaller")
        return image
