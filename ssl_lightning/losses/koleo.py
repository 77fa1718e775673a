"""The KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search", sec. 3.2, eq. 5,
after the Kozachenko-Leonenko differential-entropy estimator), as DINOv2 uses it on the student's [CLS] features
(Oquab et al. 2023, sec. 4): ``-1/n sum_i log(rho_i)``, ``rho_i`` the distance of sample ``i`` to its nearest
neighbour among the other samples of the batch. Minimising it spreads the features apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F

KOLEO_EPS = 1e-8  # the reference code's (facebookresearch/dinov2, loss/koleo_loss.py): normalisation, distance, log


def koleo_loss(features: torch.Tensor, eps: float = KOLEO_EPS) -> torch.Tensor:
    """``-mean_i log(||x_i - x_{n(i)} + eps|| + eps)`` over the L2-normalised rows ``x_i`` of ``features`` (n, d),
    ``n(i) = argmin_{j != i} ||x_i - x_j||`` (the largest dot product among the others), in float32.

    The neighbours are searched in ``features`` only: DINOv2 calls it on each global crop's [CLS] features of
    one rank (never two crops of the same image together, and not across ranks). The neighbour choice takes no
    gradient; the distance to it does. Needs at least 2 rows.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs features of shape (n, d) with n >= 2, got {tuple(features.shape)}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.float(), dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.T
            dots.fill_diagonal_(-float("inf"))  # never its own neighbour
            nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], eps=eps)
        return -torch.log(distances + eps).mean()
