"""Random resized crops of images of different sizes already on the device (decoded there from their files).

Boxes follow torchvision's ``RandomResizedCrop`` (``sample_crop_boxes`` with each image's own height and width),
drawn per sample from the step's generator; each crop is resized with antialiasing, as the worker path's
``CroppedView`` does, so the views match the worker path's for the same boxes. The result feeds
``BatchedViews.with_boxes(crops, generator, crop=False, views=count)`` for the rest of the recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.transforms.batched import CROP_ATTEMPTS, sample_crop_boxes


def draw_crop_boxes(
    sizes: torch.Tensor, generator: torch.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> torch.Tensor:
    """(N, 4) boxes (top, left, height, width) in pixels for images of ``sizes`` (N, 2) (height, width)."""
    u = torch.rand(sizes.shape[0], 2 * CROP_ATTEMPTS + 2, generator=generator, device=generator.device)
    u_scale, u_ratio, u_position = u.to(sizes.device).split((CROP_ATTEMPTS, CROP_ATTEMPTS, 2), dim=1)
    return sample_crop_boxes(u_scale, u_ratio, u_position, sizes[:, 0], sizes[:, 1], scale, ratio)


def resized_crops(images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each uint8 (3, H, W) image to its box and resize it to (size, size), bilinear with antialiasing
    (torchvision's ``resized_crop(..., antialias=True)``): uint8 (N, 3, size, size).

    One ``interpolate`` per image: the crops have different shapes (the boxes are read on the host once).
    """
    crops = [
        F.interpolate(image[None, :, top : top + height, left : left + width].float(), size=(size, size),
                      mode="bilinear", antialias=True, align_corners=False)
        for image, (top, left, height, width) in zip(images, boxes.long().tolist())
    ]
    return torch.cat(crops).round_().clamp_(0, 255).to(torch.uint8)


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
    return resized_crops(images * views, boxes, size), boxes / sizes.repeat(1, 2)
