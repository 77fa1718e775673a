"""Cosine regression losses of the non-contrastive methods: BYOL's normalized MSE (Grill et al. 2020,
"Bootstrap Your Own Latent", eq. 2) and SimSiam's negative cosine similarity (Chen and He 2021,
"Exploring Simple Siamese Representation Learning", eq. 1).

Both take a prediction ``p`` and a target ``z``; stop-gradient on the target is the method's business
(BYOL's target network has no gradient, SimSiam detaches ``z``), so the functions stay plain math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(f"expected a prediction and a target of one shape (N, D), got {tuple(p.shape)} and {tuple(z.shape)}")
    return F.cosine_similarity(p, z, dim=1)


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z)``, averaged over the batch."""
    return (2 - 2 * _cosine(p, z)).mean()


def negative_cosine_similarity(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``D(p, z) = -cos(p, z)``, averaged over the batch (minimum -1)."""
    return -_cosine(p, z).mean()
