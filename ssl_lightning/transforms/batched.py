"""The SimCLR recipe (Chen et al. 2020, appendix A) on a whole batch on its device.

Every random parameter is drawn PER SAMPLE from an explicit ``torch.Generator`` (a torchvision v2
transform called on a batch draws one parameter set for the whole batch, which is what this avoids).
No Python loop runs over samples: crop + flip is one per-sample affine grid, colour ops take
per-sample factor tensors, blur is one grouped separable convolution.

The helpers below are pure functions on float images in [0, 1] shaped (B, 3, H, W) with per-sample
factors shaped (B,); they follow ``torchvision.transforms.v2.functional`` and are tested against it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the recipe's type only: at run time simclr.py imports this module, never the reverse
    from ssl_lightning.transforms.simclr import SimCLRViews

CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop
#: the recipe fields a view may set for itself in ``SimCLRViews.per_view`` (one draw per sample and view)
PER_VIEW_FIELDS = ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")


def blur_kernel_size(size: int) -> int:
    """Gaussian blur kernel size: 10% of the image side, made odd (SimCLR appendix A)."""
    return int(0.1 * size) // 2 * 2 + 1


GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision
SOLARIZE_THRESHOLD = 128  # of 255: BYOL's 0.5 threshold on uint8 images, as torchvision's RandomSolarize(128)
# Columns of the per-sample uniform draw: crop scale x10, log ratio x10, top/left, flip, jitter switch,
# jitter factors (brightness, contrast, saturation, hue), grayscale switch, blur switch, sigma, solarize switch.
_DRAWS = (CROP_ATTEMPTS, CROP_ATTEMPTS, 2, 1, 1, 4, 1, 1, 1, 1)


def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


def sample_crop_boxes(
    u_scale: torch.Tensor,
    u_log_ratio: torch.Tensor,
    u_position: torch.Tensor,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` box sampling, vectorized over samples.

    ``u_scale`` and ``u_log_ratio`` hold (B, attempts) uniforms in [0, 1): the area fraction is uniform
    in ``scale`` and the aspect ratio log-uniform in ``ratio``; the first attempt that fits the image
    wins, and a sample without one falls back to the central crop clamped to ``ratio``. ``u_position``
    (B, 2) places the box. ``height`` and ``width`` are the image's, or each sample's as (B,) tensors
    (images of different sizes). Returns (B, 4) integer-valued float boxes ``(top, left, height, width)``.
    """
    per_sample = isinstance(height, torch.Tensor)
    if per_sample:
        height, width = height.to(u_scale).view(-1, 1), width.to(u_scale).view(-1, 1)  # type: ignore[union-attr]
    area = height * width
    target_area = area * _uniform(u_scale, *scale)
    aspect = torch.exp(_uniform(u_log_ratio, math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt
    found = fits.any(dim=1)
    if per_sample:
        height, width = height.view(-1), width.view(-1)  # type: ignore[union-attr]
    fallback_h, fallback_w = _central_crop_size(height, width, ratio)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
    top = torch.minimum(torch.floor(u_position[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u_position[:, 1] * (width - w + 1)), width - w)
    top = torch.where(found, top, (height - fallback_h) // 2)
    left = torch.where(found, left, (width - fallback_w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _central_crop_size(
    height: int | torch.Tensor, width: int | torch.Tensor, ratio: tuple[float, float]
) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """torchvision's fallback: the whole image, cut to the nearest aspect ratio allowed (per sample for tensors,
    in float64 as torchvision's Python arithmetic)."""
    if isinstance(height, torch.Tensor) and isinstance(width, torch.Tensor):
        in_ratio = width.double() / height.double()
        h = torch.where(in_ratio < min(ratio), torch.round(width.double() / min(ratio)).to(height), height)
        w = torch.where(in_ratio > max(ratio), torch.round(height.double() * max(ratio)).to(width), width)
        return h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        return float(round(width / min(ratio))), float(width)
    if in_ratio > max(ratio):
        return float(height), float(round(height * max(ratio)))
    return float(height), float(width)


def resized_crop_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each sample to its box, resize it to (size, size) bilinearly and mirror it where ``flip``.

    Crop + flip is a per-sample axis-aligned affine map, so its sampling grid (align_corners=False)
    is the outer product of two per-sample coordinate vectors: built directly, it costs O(B * size)
    instead of ``F.affine_grid``'s batched matmul over every output pixel. Coordinates are clamped to
    the box's edge pixel centres, so this equals ``torchvision``'s ``resized_crop(..., antialias=False)``.
    """
    b, _, height, width = x.shape
    top, left, h, w = boxes.to(x.dtype).unbind(1)
    centres = (torch.arange(size, dtype=x.dtype, device=x.device) + 0.5) / size  # output pixels in (0, 1)
    along_x = torch.where(flip.view(-1, 1), 1 - centres, centres)
    grid_x = _box_coordinates(left, w, along_x, width)
    grid_y = _box_coordinates(top, h, centres.expand(b, size), height)
    grid = torch.stack(
        [grid_x.view(b, 1, size).expand(b, size, size), grid_y.view(b, size, 1).expand(b, size, size)], dim=-1
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _box_coordinates(start: torch.Tensor, length: torch.Tensor, along: torch.Tensor, extent: int) -> torch.Tensor:
    """Normalized input coordinates of the points ``along`` (B, size) in [0, 1] of each box side."""
    start, length = start.view(-1, 1), length.view(-1, 1)
    pixel = torch.maximum(torch.minimum(start + length * along - 0.5, start + length - 1), start)
    return (2 * pixel + 1) / extent - 1


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = _per_sample(factor)
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply each sample by its factor."""
    return (x * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each sample with the mean of its grayscale image."""
    return _blend(x, rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each sample with its grayscale image."""
    return _blend(x, rgb_to_grayscale(x), factor)


def _wrap(x: torch.Tensor, period: float) -> torch.Tensor:
    """``x`` modulo ``period`` in [0, period) (cheaper than ``torch.remainder`` on CPU)."""
    return x - period * torch.floor(x / period)


def _sector_chroma_value(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in sixths of a turn (in [-1, 5)), chroma (max - min) and value (max), each (B, 1, H, W)."""
    r, g, b = x.split(1, dim=-3)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    offset = torch.where(value == r, g - b, torch.where(value == g, b - r + 2 * chroma, r - g + 4 * chroma))
    return offset / chroma.clamp_min(1e-12), chroma, value


def _from_sector_chroma_value(sector: torch.Tensor, chroma: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Channel c = ``value - chroma * clamp(min(k, 4 - k), 0, 1)``, ``k = (n_c + sector) mod 6``, n = 5, 3, 1."""
    n = torch.arange(5.0, 0.0, -2.0, dtype=value.dtype, device=value.device).view(3, 1, 1)  # built on device: no copy
    k = n + _wrap(sector, 6.0)  # in [1, 11)
    k = torch.where(k >= 6, k - 6, k)
    return value - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> HSV, hue in [0, 1)."""
    sector, chroma, value = _sector_chroma_value(x)
    return torch.cat([_wrap(sector / 6, 1.0), chroma / value.clamp_min(1e-12), value], dim=-3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV -> RGB; hue is periodic with period 1."""
    hue, saturation, value = x.split(1, dim=-3)
    return _from_sector_chroma_value(6 * hue, saturation * value, value)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's hue by its shift in [-0.5, 0.5] (the HSV round trip, without forming S)."""
    sector, chroma, value = _sector_chroma_value(x)
    return _from_sector_chroma_value(sector + 6 * _per_sample(shift), chroma, value)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each sample with its own sigma: one grouped separable convolution, reflect padding."""
    b, c, height, width = x.shape
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - half
    kernel = torch.exp(-0.5 * (offsets / sigma.to(x.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, b * c, height, width), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    y = F.conv2d(y, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return y.view(b, c, height, width)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Invert the pixels at or above the threshold (float images in [0, 1])."""
    return torch.where(x >= SOLARIZE_THRESHOLD / 255, 1 - x, x)


def _select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(mask), a, b)


class ViewDraws(NamedTuple):
    """The per-sample parameters of one batch of views (all (B,) unless noted)."""

    boxes: torch.Tensor  # (B, 4) crop boxes in pixels: top, left, height, width
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor  # (B, 4) uniforms of brightness, contrast, saturation, hue
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor


class BatchedViews:
    """One SimCLR view of every image of a uint8 batch, made on the batch's device.

    Parameters are drawn per sample from the given generator, never the global RNG, so each rank can
    own a generator (and checkpoint its state). A generator on the batch's device avoids a host copy.
    Differences from the per-sample path: resizing is bilinear without antialiasing (identical when
    upscaling, as for CIFAR; aliasing when downscaling large images), jitter runs on float images
    rather than uint8, and the four jitter ops run in a FIXED order (brightness, contrast, saturation,
    hue) where torchvision's ``ColorJitter`` draws a random order per call.
    """

    def __init__(self, recipe: SimCLRViews, compile: bool = False) -> None:
        self.recipe = recipe
        self._applies = {name: max(recipe.view_probabilities(name)) > 0 for name in PER_VIEW_FIELDS}
        self._blurs = recipe.blurs  # read once: the property rebuilds each view's recipe
        self._colour = torch.compile(self.colour, dynamic=False) if compile else self.colour
        self._finish = torch.compile(self.finish, dynamic=False) if compile else self.finish
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._probabilities: dict[tuple[int, int, torch.device], dict[str, torch.Tensor]] = {}

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, crop: bool = True, views: int = 1
    ) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 normalized (B, 3, size, size); see ``with_boxes``."""
        return self.with_boxes(images, generator, crop, views)[0]

    def with_boxes(
        self, images: torch.Tensor, generator: torch.Generator, crop: bool = True, views: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> float32 normalized (B, 3, size, size) and each view's (B, 5) box
        (top, left, height, width, flipped), the crop's place in fractions of the image's sides.

        ``images`` holds ``views`` equal blocks of rows, block ``v`` made with view ``v``'s probabilities
        (``recipe.per_view``). With ``crop=False`` the images must already be (B, 3, size, size) (cropped
        in workers by ``recipe.worker_crop()``): only flip and the photometric ops apply, and the boxes
        are the whole crop.
        """
        self._check(images, crop, views)
        r = self.recipe
        u = torch.rand(images.shape[0], sum(_DRAWS), generator=generator, device=generator.device)
        u_scale, u_ratio, u_pos, u_flip, u_jitter, u_factors, u_gray, u_blur, u_sigma, u_solarize = u.to(
            images.device
        ).split(_DRAWS, dim=1)
        chance = self._chances(images.shape[0], views, images.device)
        height, width = images.shape[-2:]
        if crop:
            boxes = sample_crop_boxes(u_scale, u_ratio, u_pos, height, width, r.scale, r.ratio)
        else:
            boxes = torch.zeros(images.shape[0], 4, device=images.device)
            boxes[:, 2:] = r.size  # the whole crop
        draws = ViewDraws(
            boxes=boxes,
            flip=u_flip.squeeze(1) < chance["hflip_p"],
            jitter=u_jitter.squeeze(1) < chance["jitter_p"],
            factors=u_factors,
            grayscale=u_gray.squeeze(1) < chance["grayscale_p"],
            blur=u_blur.squeeze(1) < chance["blur_p"],
            sigma=_uniform(u_sigma.squeeze(1), *r.blur_sigma),
            solarize=u_solarize.squeeze(1) < chance["solarize_p"],
        )
        views_made = self.render(images, draws, crop)
        top, left, box_height, box_width = boxes.float().unbind(1)
        places = [top / height, left / width, box_height / height, box_width / width, draws.flip.float()]
        return views_made, torch.stack(places, dim=1)

    def render(self, images: torch.Tensor, draws: ViewDraws, crop: bool) -> torch.Tensor:
        """The recipe with the parameters ``draws``: uint8 (B, 3, H, W) -> float32 normalized views.

        The elementwise stages (``colour``, ``finish``) are compiled when asked; crop and blur stay eager
        (``grid_sample`` and the grouped convolution were faster eager than inductor's code on CPU).
        """
        r = self.recipe
        x = images.float().div_(255)
        if crop:
            x = resized_crop_flip(x, draws.boxes, draws.flip, r.size)
        elif self._applies["hflip_p"]:
            x = _select(draws.flip, x.flip(-1), x)
        x = self._colour(x, draws)
        if self._blurs:
            x = _select(draws.blur, gaussian_blur(x, draws.sigma, blur_kernel_size(r.size)), x)
        return self._finish(x, draws, *self._normalization(x.device))

    def colour(self, x: torch.Tensor, draws: ViewDraws) -> torch.Tensor:
        """Colour jitter and grayscale where drawn: about 30 elementwise passes that compile into a few."""
        if self._applies["jitter_p"]:
            x = _select(draws.jitter, self._jitter(x, draws.factors), x)
        if self._applies["grayscale_p"]:
            x = _select(draws.grayscale, rgb_to_grayscale(x).expand_as(x), x)
        return x

    def finish(self, x: torch.Tensor, draws: ViewDraws, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Solarization where drawn, then normalization (``x * scale + shift``)."""
        if self._applies["solarize_p"]:
            x = _select(draws.solarize, solarize(x), x)
        return torch.addcmul(shift, x, scale)

    def _chances(self, rows: int, views: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Each row's probability of every per-view op, (rows,) per name, views in blocks; cached, so a
        step makes no host-to-device copy."""
        key = (rows, views, device)
        if key not in self._probabilities:
            self._probabilities[key] = {
                name: torch.tensor(self.recipe.view_probabilities(name)[:views], device=device).repeat_interleave(
                    rows // views
                )
                for name in PER_VIEW_FIELDS
            }
        return self._probabilities[key]

    def _check(self, images: torch.Tensor, crop: bool, views: int) -> None:
        shape = tuple(images.shape)
        if images.dtype != torch.uint8:
            raise ValueError(f"BatchedViews expects uint8 images, got {images.dtype} of shape {shape}")
        if images.ndim != 4 or shape[1] != 3:
            raise ValueError(f"BatchedViews expects images shaped (B, 3, H, W), got shape {shape}")
        size = self.recipe.size
        if not crop and shape[-2:] != (size, size):
            raise ValueError(f"crop=False needs images already cropped to (B, 3, {size}, {size}), got shape {shape}")
        if not 1 <= views <= self.recipe.num_views or shape[0] % views:
            raise ValueError(f"views={views}: the recipe has {self.recipe.num_views} views and the {shape[0]} images "
                             "must split into equal blocks, one per view")

    def _jitter(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Colour jitter with per-sample factors, in the fixed order brightness, contrast, saturation, hue."""
        r = self.recipe
        u_brightness, u_contrast, u_saturation, u_hue = u.unbind(1)
        if r.brightness > 0:
            x = adjust_brightness(x, _uniform(u_brightness, max(0.0, 1 - r.brightness), 1 + r.brightness))
        if r.contrast > 0:
            x = adjust_contrast(x, _uniform(u_contrast, max(0.0, 1 - r.contrast), 1 + r.contrast))
        if r.saturation > 0:
            x = adjust_saturation(x, _uniform(u_saturation, max(0.0, 1 - r.saturation), 1 + r.saturation))
        if r.hue > 0:
            x = adjust_hue(x, _uniform(u_hue, -r.hue, r.hue))
        return x

    def _normalization(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x - mean) / std`` as ``shift + x * scale``: (1, 3, 1, 1) tensors cached per device."""
        if device not in self._stats:
            mean = torch.tensor(self.recipe.mean, dtype=torch.float64)
            std = torch.tensor(self.recipe.std, dtype=torch.float64)
            self._stats[device] = tuple(  # type: ignore[assignment]
                t.to(device=device, dtype=torch.float32).view(1, 3, 1, 1) for t in (-mean / std, 1 / std)
            )
        return self._stats[device]
