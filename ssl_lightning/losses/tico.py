"""TiCo (Zhu et al. 2022, "TiCo: Transformation Invariance and Covariance Contrast for Self-Supervised Visual
Representation Learning", eq. 5-6): the views' embeddings agree (invariance) while each is pushed away from the
directions a running covariance of past embeddings already covers (covariance contrast)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import all_reduce_sum_with_grad, world_size


class TiCoTerms(NamedTuple):
    loss: torch.Tensor
    invariance: torch.Tensor
    contrast: torch.Tensor
    covariance: torch.Tensor  # the updated running covariance C_t (D, D), float32, detached: the caller keeps it


def tico_loss(z1: torch.Tensor, z2: torch.Tensor, covariance: torch.Tensor, beta: float = 0.9,
              rho: float = 20.0) -> TiCoTerms:
    """``C_t = beta C_{t-1} + (1 - beta) Z1^T Z1 / N`` over the GLOBAL batch (the sum all-reduced with gradient) and
    ``L = 1 - mean_i cos(z1_i, z2_i) + rho mean_i z1_i^T C_t z1_i``, with ``z`` L2-normalized, in float32.
    ``covariance``: ``C_{t-1}`` (D, D). A DDP run gives one process's loss, gradients and ``C_t`` on the full batch."""
    if z1.shape != z2.shape or z1.ndim != 2 or covariance.shape != (z1.shape[1], z1.shape[1]):
        raise ValueError(f"tico_loss expects z1, z2 of one shape (N, D) and a (D, D) covariance, got "
                         f"{tuple(z1.shape)}, {tuple(z2.shape)} and {tuple(covariance.shape)}")
    with torch.autocast(z1.device.type, enabled=False):  # the covariance in float32 whatever the precision
        a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        batch = a.shape[0] * world_size()
        current = beta * covariance.float() + (1 - beta) * all_reduce_sum_with_grad(a.T @ a) / batch
        invariance = 1 - (a * b).sum(dim=1).mean()
        contrast = rho * ((a @ current) * a).sum(dim=1).mean()
        return TiCoTerms(invariance + contrast, invariance, contrast, current.detach())
