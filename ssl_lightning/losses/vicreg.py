"""VICReg loss (Bardes, Ponce, LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", eq. 1-6 and Algorithm 1): invariance between the two views' embeddings, a
hinge keeping each dimension's standard deviation at 1, and decorrelation of the dimensions."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import all_reduce_sum_with_grad, world_size
from ssl_lightning.losses.barlow_twins import float32_or_wider, off_diagonal


class VICRegLoss(NamedTuple):
    """``loss = lambda * invariance + mu * variance + nu * covariance``; the terms are unweighted."""

    loss: torch.Tensor
    invariance: torch.Tensor  # s(Z, Z'): mean squared error
    variance: torch.Tensor  # v(Z) + v(Z')
    covariance: torch.Tensor  # c(Z) + c(Z')


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    eps: float = 1e-4,
) -> VICRegLoss:
    """VICReg's ``lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')]`` (eq. 6, Algorithm 1).

    ``z1[b]`` and ``z2[b]`` (N, D) are the expander outputs of two views of sample ``b``.
    ``s`` is the mean squared error over N x D; ``v(Z) = mean_j relu(1 - sqrt(Var(z^j) + eps))``;
    ``c(Z) = sum_{i != j} C(Z)_ij^2 / D`` with the covariance ``C(Z)`` over N - 1. The variance term sums
    both branches as the paper does (the official code halves it). Means, variances and covariances are
    over the GLOBAL batch: the batch sums and ``C`` are all-reduced with gradient, so every rank computes
    the loss of one process on the full batch. Every rank must pass the same number of rows. Computed in
    float32 under autocast.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"vicreg_loss expects two (N, D) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    total, dim = z1.shape[0] * world_size(), z1.shape[1]
    if total < 2:
        raise ValueError(f"vicreg_loss needs at least 2 samples in the global batch for a variance, got {total}")
    with torch.autocast(z1.device.type, enabled=False):
        z = float32_or_wider(torch.stack([z1, z2]))  # (2 views, n, D)
        invariance = all_reduce_sum_with_grad((z[0] - z[1]).pow(2).sum()) / (total * dim)
        centered = z - all_reduce_sum_with_grad(z.sum(dim=1, keepdim=True)) / total
        cov = all_reduce_sum_with_grad(centered.transpose(1, 2) @ centered) / (total - 1)  # (2, D, D)
        std = torch.sqrt(cov.diagonal(dim1=1, dim2=2) + eps)  # (2, D)
        variance = F.relu(1 - std).mean(dim=1).sum()
        covariance = off_diagonal(cov).pow(2).sum() / dim
    loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    return VICRegLoss(loss, invariance, variance, covariance)
