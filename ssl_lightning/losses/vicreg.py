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
    total = z1.shape[0] * world_size()
    if total < 2:
        raise ValueError(f"vicreg_loss needs at least 2 samples in the global batch for a variance, got {total}")
    with torch.autocast(z1.device.type, enabled=False):
        z = float32_or_wider(torch.stack([z1, z2]))  # (2 views, n, D)
        invariance = global_mse(z[0], z[1])
        variance, covariance = (term.sum() for term in variance_covariance(z, eps))
    loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    return VICRegLoss(loss, invariance, variance, covariance)


def global_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """VICReg's ``s(Z, Z')``: the mean squared error over every entry of the GLOBAL batch (the squared errors'
    sum all-reduced with gradient; every rank passes the same shape)."""
    return all_reduce_sum_with_grad((a - b).pow(2).sum()) / (a.numel() * world_size())


def variance_covariance(z: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's ``v(Z) = mean_j relu(1 - sqrt(Var(z^j) + eps))`` and ``c(Z) = sum_{i != j} C(Z)_ij^2 / D`` of every
    (n, D) matrix in ``z`` (..., n, D): two tensors of shape (...). Means and covariances (over N - 1) are over the
    GLOBAL batch of ``N = n x world size`` rows: the row sums and ``C`` are all-reduced with gradient."""
    total, dim = z.shape[-2] * world_size(), z.shape[-1]
    centered = z - all_reduce_sum_with_grad(z.sum(dim=-2, keepdim=True)) / total
    cov = all_reduce_sum_with_grad(centered.transpose(-1, -2) @ centered) / (total - 1)  # (..., D, D)
    std = torch.sqrt(cov.diagonal(dim1=-2, dim2=-1) + eps)  # (..., D)
    return F.relu(1 - std).mean(dim=-1), off_diagonal(cov).pow(2).sum(dim=(-2, -1)) / dim
