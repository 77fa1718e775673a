"""Random masks drawn on a coarse grid of mask patches and upsampled to a finer grid (SimMIM, Xie et al. 2022,
sec. 3.1: 32 px mask patches over a ViT's 16 px or a Swin's 4 px patches, mask ratio 0.6)."""

from __future__ import annotations

import torch

from ssl_lightning.nn.masking.random import random_mask


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, rows, cols) -> (B, rows * factor, cols * factor): every cell repeated over a ``factor`` x ``factor``
    block (a mask patch over the model patches it covers, or a model patch over its pixels)."""
    if factor < 1:
        raise ValueError(f"upsample_mask: factor must be at least 1, got {factor}")
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def coarse_random_mask(
    batch: int,
    rows: int,
    cols: int,
    factor: int,
    mask_ratio: float,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """(batch, rows, cols) bool on the fine grid, True on masked cells: ``round(mask_ratio * cells)`` of the
    ``(rows / factor) x (cols / factor)`` coarse cells chosen uniformly per image (``random_mask``, batched),
    each covering ``factor x factor`` fine cells, so every image masks exactly the same share."""
    if factor < 1 or rows % factor or cols % factor:
        raise ValueError(f"coarse_random_mask: a {rows}x{cols} grid is not divisible into {factor}x{factor} mask patches")
    coarse = random_mask(batch, (rows // factor) * (cols // factor), mask_ratio, generator, device)
    return upsample_mask(coarse.view(batch, rows // factor, cols // factor), factor)
