"""Barlow Twins loss (Zbontar, Jing, Misra, LeCun, Deny 2021, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", eq. 1-2 and Algorithm 1): the cross-correlation matrix of the two views'
batch-normalized embeddings is pushed towards the identity."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ssl_lightning.distributed import all_reduce_sum_with_grad, world_size


class BarlowTwinsLoss(NamedTuple):
    """``loss = on_diag + off_diagonal_weight * off_diag``; the terms are unweighted."""

    loss: torch.Tensor
    on_diag: torch.Tensor  # invariance: sum_i (1 - c_ii)^2
    off_diag: torch.Tensor  # redundancy reduction: sum_{i != j} c_ij^2


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of the square matrices in the last two dimensions, as (..., D - 1, D)."""
    d = matrix.shape[-1]
    if matrix.shape[-2] != d:
        raise ValueError(f"off_diagonal expects square matrices, got shape {tuple(matrix.shape)}")
    return matrix.flatten(-2)[..., :-1].reshape(*matrix.shape[:-2], d - 1, d + 1)[..., 1:]


def float32_or_wider(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as float32 if it is half precision: batch sums and D x D matrices lose too much in 16 bits."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, off_diagonal_weight: float = 0.0051, eps: float = 1e-5
) -> BarlowTwinsLoss:
    """``sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2`` with ``C = z1_norm.T @ z2_norm / N`` (eq. 1-2).

    ``z1[b]`` and ``z2[b]`` (N, D) are the projector outputs of two views of sample ``b``. Each dimension
    is normalized over the GLOBAL batch as a non-affine BatchNorm in training mode does (mean, biased
    variance, ``eps``), and ``C`` sums over the global batch: the batch sums and ``C`` are all-reduced
    with gradient (as the official code all-reduces ``C``), so every rank computes the loss of one process
    on the full batch. Every rank must pass the same number of rows. Computed in float32 under autocast.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"barlow_twins_loss expects two (N, D) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    with torch.autocast(z1.device.type, enabled=False):
        z = float32_or_wider(torch.stack([z1, z2]))  # (2 views, n, D)
        total = z.shape[1] * world_size()
        centered = z - all_reduce_sum_with_grad(z.sum(dim=1, keepdim=True)) / total
        variance = all_reduce_sum_with_grad(centered.pow(2).sum(dim=1, keepdim=True)) / total
        z1_norm, z2_norm = centered / torch.sqrt(variance + eps)
        c = all_reduce_sum_with_grad(z1_norm.T @ z2_norm) / total  # (D, D) cross-correlation
        on_diag = (1 - c.diagonal()).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
    return BarlowTwinsLoss(on_diag + off_diagonal_weight * off_diag, on_diag, off_diag)
