"""W-MSE (Ermolov et al. 2021, "Whitening for Self-Supervised Representation Learning", sec. 3-4): the embeddings
of each view are whitened on sub-batches (Cholesky), then the views' whitened embeddings are pulled together with
the normalized MSE; whitening scatters them, so nothing collapses without negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import gather_with_grad


def whiten(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``(x - mean) W^T`` with ``W = L^-1`` and ``L L^T = (1 - eps) Cov(x) + eps I`` (Cholesky; Cov with N - 1):
    rows of ``x`` (N, D) whose sample covariance is the identity, computed in float32 (or float64 when given)."""
    rows, dim = x.shape
    if rows <= dim:
        raise ValueError(f"W-MSE whitens sub-batches of {rows} embeddings of size {dim}: a sub-batch must be larger "
                         f"than the embedding (its covariance is singular otherwise); raise whitening_size above {dim} "
                         f"or lower projection_dim below {rows}")
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        centered = x - x.mean(dim=0, keepdim=True)
        covariance = centered.T @ centered / (rows - 1)
        eye = torch.eye(dim, dtype=x.dtype, device=x.device)
        cholesky = torch.linalg.cholesky((1 - eps) * covariance + eps * eye)
        inverse = torch.linalg.solve_triangular(cholesky, eye, upper=False)
        return centered @ inverse.T


def wmse_loss(views: list[torch.Tensor], whitening_size: int, generator: torch.Generator, iterations: int = 1,
              eps: float = 0.0) -> torch.Tensor:
    """The W-MSE loss of K views' embeddings (each (n, D), the same n images on this rank): gathered from every
    rank in rank order (with gradient), for each of ``iterations`` random permutations of the global batch
    (``generator``: the same on every rank) split into sub-batches of ``whitening_size`` images, each view's
    sub-batch whitened, then ``2 - 2 cos`` between the whitened embeddings of every pair of views, averaged.
    Every rank computes the global loss, so DDP's averaged gradients are one process's on the full batch."""
    if len(views) < 2 or any(v.shape != views[0].shape or v.ndim != 2 for v in views):
        raise ValueError(f"wmse_loss needs at least 2 views of one shape (n, D), got {[tuple(v.shape) for v in views]}")
    every = [gather_with_grad(v) for v in views]
    total = every[0].shape[0]
    if total % whitening_size:
        raise ValueError(f"W-MSE: the global batch ({total} images) is not a multiple of whitening_size={whitening_size}")
    losses = []
    for _ in range(iterations):
        order = torch.randperm(total, generator=generator).to(every[0].device).view(-1, whitening_size)
        whitened = [torch.cat([whiten(v[rows], eps) for rows in order]) for v in every]
        for i in range(len(whitened)):
            for j in range(i + 1, len(whitened)):
                cosine = (F.normalize(whitened[i], dim=1) * F.normalize(whitened[j], dim=1)).sum(dim=1)
                losses.append(2 - 2 * cosine.mean())
    return torch.stack(losses).mean()
