"""Hole masks for inpainting (Pathak et al. 2016, "Context Encoders: Feature Learning by Inpainting",
sec. 3.3): a central square, or several random squares that may overlap. True marks a hidden pixel."""

from __future__ import annotations

import torch


def _side(fraction: float, extent: int) -> int:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"hole_fraction must lie in (0, 1], got {fraction!r}")
    return max(1, round(fraction * extent))


def _boxes_mask(
    top: torch.Tensor, left: torch.Tensor, side_h: int, side_w: int, height: int, width: int
) -> torch.Tensor:
    """(B, N) box corners -> (B, 1, H, W) union of the N boxes."""
    rows = torch.arange(height, device=top.device)
    cols = torch.arange(width, device=top.device)
    in_rows = (rows >= top[..., None]) & (rows < top[..., None] + side_h)  # (B, N, H)
    in_cols = (cols >= left[..., None]) & (cols < left[..., None] + side_w)  # (B, N, W)
    return (in_rows[..., :, None] & in_cols[..., None, :]).any(dim=1, keepdim=True)


def center_mask(batch: int, height: int, width: int, hole_fraction: float, device: torch.device) -> torch.Tensor:
    """The central square whose sides are ``hole_fraction`` of the image's (1/2: a quarter of the area, as
    the paper's central region): (batch, 1, H, W) bool."""
    side_h, side_w = _side(hole_fraction, height), _side(hole_fraction, width)
    top = torch.full((batch, 1), (height - side_h) // 2, device=device)
    left = torch.full((batch, 1), (width - side_w) // 2, device=device)
    return _boxes_mask(top, left, side_h, side_w, height, width)


def random_boxes_mask(
    batch: int, height: int, width: int, hole_fraction: float, num_boxes: int, generator: torch.Generator
) -> torch.Tensor:
    """``num_boxes`` squares per sample, sides ``hole_fraction`` of the image's, placed uniformly at random
    inside the image from ``generator`` (on the target device); they may overlap: (batch, 1, H, W) bool."""
    if num_boxes < 1:
        raise ValueError(f"num_boxes must be at least 1, got {num_boxes}")
    side_h, side_w = _side(hole_fraction, height), _side(hole_fraction, width)
    u = torch.rand(batch, num_boxes, 2, generator=generator, device=generator.device)
    top = (u[..., 0] * (height - side_h + 1)).long()
    left = (u[..., 1] * (width - side_w + 1)).long()
    return _boxes_mask(top, left, side_h, side_w, height, width)
