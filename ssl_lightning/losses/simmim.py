"""SimMIM's reconstruction loss (Xie et al. 2022, sec. 3.4): L1 between predicted and true pixels, on the
masked pixels only."""

from __future__ import annotations

import torch

SIMMIM_EPS = 1e-5  # the reference code's guard in the denominator


def simmim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_{masked pixels p, channels c} |pred - target| / (#masked pixels + 1e-5) / C``: the mean absolute
    error per masked pixel and channel, normalised as the paper's code does (over the whole local batch).

    Args:
        pred: predicted images (B, C, H, W).
        target: the true (normalized) images (B, C, H, W).
        mask: (B, H, W), True (or 1) on masked pixels, where the loss is taken.
    """
    if pred.shape != target.shape or mask.shape != (pred.shape[0], *pred.shape[2:]):
        raise ValueError(
            f"simmim_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} do not match"
        )
    weight = mask.to(pred.dtype).unsqueeze(1)
    return ((pred - target).abs() * weight).sum() / (weight.sum() + SIMMIM_EPS) / pred.shape[1]
