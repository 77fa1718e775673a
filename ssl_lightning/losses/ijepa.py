"""I-JEPA's loss (Assran et al. 2023, eq. 3): the squared L2 distance between predicted and target patch
representations, summed over each target block's patches and averaged over the blocks (and over the images).

The reference code (facebookresearch/ijepa ``src/train.py``) uses ``F.smooth_l1_loss`` instead, averaged over every
element; we follow the paper. Under AdamW the constant factor between a sum and a mean changes little; smooth-L1
differs from the squared distance where an element's error exceeds 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_normed_targets(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The target encoder's patch tokens (B, N, D) layer-normed over the feature dimension (no affine parameters),
    then taken at each target block's patches ``indices`` (B, M, t): (B, M, t, D). The norm is over the features of
    each patch of the full image, before the target patches are selected."""
    normed = F.layer_norm(tokens, tokens.shape[-1:])
    batch, blocks, per_block = indices.shape
    flat = indices.reshape(batch, blocks * per_block, 1).expand(-1, -1, normed.shape[-1])
    return torch.gather(normed, 1, flat).reshape(batch, blocks, per_block, -1)


def ijepa_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean over images and blocks i of sum_{j in B_i} ||prediction_j - target_j||_2^2``, in float32.

    Args:
        predictions: (B, M, t, D) the predictor's outputs for M target blocks of t patches per image.
        targets: (B, M, t, D) the layer-normed target representations (no gradient).
    """
    if predictions.shape != targets.shape or predictions.ndim != 4:
        raise ValueError(f"ijepa_loss: predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} "
                         f"must both be (B, M, t, D)")
    return (predictions.float() - targets.float()).pow(2).sum(dim=(2, 3)).mean()
