"""The reconstruction loss of context encoders (Pathak et al. 2016, eq. 1): L2 on the hidden region only."""

from __future__ import annotations

import torch


def hidden_region_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden pixels: ``mask`` (B, 1, H, W) or (B, C, H, W), True where hidden;
    ``prediction`` and ``target`` (B, C, H, W). Pixels outside the hole do not count; 0 when nothing is hidden."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction shaped {tuple(prediction.shape)} does not match target shaped {tuple(target.shape)}"
        )
    mask = mask.expand_as(target)
    squared = (prediction - target).square().masked_fill(~mask, 0.0)
    return squared.sum() / mask.sum().clamp_min(1)
