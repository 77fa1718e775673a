"""Random resized crops of images of different sizes already on the device (decoded there from their files).

Boxes follow torchvision's ``RandomResizedCrop`` (``sample_crop_boxes`` with each image's own height and width),
drawn per sample from the step's generator; each crop is resized with antialiasing, as the worker path's
``CroppedView`` does, so the views match the worker path's for the same boxes. The result feeds
``BatchedViews.with_boxes(crops, generator, crop=False, views=count)`` for the rest of the recipe.
"""

from __future__ import annotations

import torch

from ssl_lightning.transforms.batched import CROP_ATTEMPTS, sample_crop_boxes

BUCKET = 128  # px: images are padded to the next multiple of this in both sides, and grouped by that size


def draw_crop_boxes(
    sizes: torch.Tensor, generator: torch.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> torch.Tensor:
    """(N, 4) boxes (top, left, height, width) in pixels for images of ``sizes`` (N, 2) (height, width)."""
    u = torch.rand(sizes.shape[0], 2 * CROP_ATTEMPTS + 2, generator=generator, device=generator.device)
    u_scale, u_ratio, u_position = u.to(sizes.device).split((CROP_ATTEMPTS, CROP_ATTEMPTS, 2), dim=1)
    return sample_crop_boxes(u_scale, u_ratio, u_position, sizes[:, 0], sizes[:, 1], scale, ratio)


def resized_crops(images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop uint8 (3, H, W) images to boxes and resize the crops to (size, size), bilinear with antialiasing
    (torchvision's ``resized_crop(..., antialias=True)``): uint8 (N, 3, size, size).

    ``boxes`` (N, 4) holds ``N / len(images)`` view-major blocks: row ``r`` crops image ``r % len(images)``. A crop
    and resize is linear and separable, ``weights_y @ image @ weights_x.T`` with per-sample resampling matrices
    (zero outside the box), so images padded to a common size go through two batched matmuls per group of
    similar sizes (sides rounded up to ``BUCKET`` px), whatever their boxes: no per-sample resize call.
    """
    count, views = len(images), boxes.shape[0] // len(images)
    out = torch.empty(views, count, 3, size, size, dtype=torch.uint8, device=boxes.device)
    per_view = boxes.view(views, count, 4).to(torch.float32)
    for (height, width), members in _groups(images).items():
        padded = torch.zeros(len(members), 3, height, width, device=boxes.device)
        for row, i in enumerate(members):
            padded[row, :, : images[i].shape[-2], : images[i].shape[-1]] = images[i]
        rows = torch.tensor(members, device=boxes.device)
        top, left, box_height, box_width = per_view[:, rows].unbind(-1)  # each (views, members)
        along_y = _resampling(top, box_height, size, height).unsqueeze(2)  # (views, members, 1, size, height)
        along_x = _resampling(left, box_width, size, width).unsqueeze(2)
        crops = along_y @ padded @ along_x.transpose(-1, -2)
        out[:, rows] = crops.round_().clamp_(0, 255).to(torch.uint8)
    return out.view(views * count, 3, size, size)


def _groups(images: list[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """Image indices by padded size: height and width rounded up to multiples of ``BUCKET``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        height, width = image.shape[-2:]
        groups.setdefault((-(-height // BUCKET) * BUCKET, -(-width // BUCKET) * BUCKET), []).append(i)
    return groups


def _resampling(start: torch.Tensor, length: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """(..., size, extent) rows of antialiased bilinear weights resampling [start, start + length) to ``size``
    points: the triangle filter widened by the downscaling factor, normalized over the box (ATen's ``_aa`` weights)."""
    scale = (length / size).unsqueeze(-1).unsqueeze(-1)
    support = scale.clamp(min=1.0)
    centres = (torch.arange(size, device=start.device) + 0.5).view(-1, 1) * scale  # in box coordinates
    offsets = torch.arange(extent, device=start.device) - start.unsqueeze(-1).unsqueeze(-1)  # pixel index in the box
    weights = (1 - (offsets + 0.5 - centres).abs() / support).clamp_(min=0)
    weights = weights * ((offsets >= 0) & (offsets < length.unsqueeze(-1).unsqueeze(-1)))
    return weights / weights.sum(-1, keepdim=True)


def random_resized_crops(
    images: list[torch.Tensor], generator: torch.Generator, size: int, scale: tuple[float, float],
    ratio: tuple[float, float], views: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``views`` random resized crops of every image, in view-major blocks (view 0 of every image first):
    uint8 (views * N, 3, size, size) and the (views * N, 4) boxes (top, left, height, width) in fractions of
    each image's height and width (the batch contract's ``boxes`` without the flip)."""
    device = images[0].device
    sizes = torch.tensor([image.shape[-2:] for image in images], device=device, dtype=torch.float32).repeat(views, 1)
    boxes = draw_crop_boxes(sizes, generator, scale, ratio)
    return resized_crops(images, boxes, size), boxes / sizes.repeat(1, 2)
