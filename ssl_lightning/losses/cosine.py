"""Cosine regression losses of the non-contrastive methods: BYOL's normalized MSE (Grill et al. 2020,
"Bootstrap Your Own Latent", eq. 2) and SimSiam's negative cosine similarity (Chen and He 2021,
"Exploring Simple Siamese Representation Learning", eq. 1), and FastSiam's average over several targets
(Pototzky et al. 2022, "FastSiam: Resource-Efficient Self-supervised Learning on a Single GPU").

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


def fastsiam_loss(predictions: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """FastSiam: ``mean_i D(p_i, mean_{j != i} z_j)`` over the K views of each image: every view's prediction
    against the mean projection of the other K - 1 views (detach ``targets`` for the stop-gradient)."""
    if len(predictions) != len(targets) or len(predictions) < 2:
        raise ValueError(f"fastsiam_loss needs one prediction and one target per view, at least 2 views; got "
                         f"{len(predictions)} predictions and {len(targets)} targets")
    total = torch.stack(targets).sum(dim=0)
    count = len(targets)
    return sum(negative_cosine_similarity(p, (total - z) / (count - 1)) for p, z in zip(predictions, targets)) / count
