"""MAE reconstruction loss (He et al. 2022, section 3): mean squared error on the masked patches only,
optionally on per-patch normalized pixels (``norm_pix_loss``)."""

from __future__ import annotations

import torch

NORM_PIX_EPS = 1e-6


def normalize_patches(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each patch (last dim) minus its mean over its own pixels, divided by ``sqrt(var + 1e-6)`` (unbiased
    variance, as the official code). Returns ``(normalized, mean, std)``, mean and std shaped (..., 1)."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()
    return (patches - mean) / std, mean, std


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = False) -> torch.Tensor:
    """``sum_i mask_i * mean_pixels (pred_i - target_i)^2 / sum_i mask_i`` over all patches ``i`` of the batch.

    Args:
        pred: predicted pixels (B, N, P).
        target: true pixels (B, N, P) (``patchify`` of the images).
        mask: (B, N), 1 on the hidden patches (where the loss is taken), 0 on the visible ones.
        norm_pix_loss: compare with each target patch normalized by its own mean and std.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"mae_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} do not match"
        )
    if norm_pix_loss:
        target = normalize_patches(target)[0]
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
