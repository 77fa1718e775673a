"""LeJEPA's loss (Balestriero and LeCun 2025, "LeJEPA: Provable and Scalable Self-Supervised Learning Without the
Heuristics", sec. 4-5, Algorithms 1-2): the predictive loss between the views of an image plus SIGReg, the
Epps-Pulley test of normality applied to random one-dimensional projections of the embeddings."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ssl_lightning.distributed import all_reduce_sum_with_grad, world_size
from ssl_lightning.losses.barlow_twins import float32_or_wider


class LeJEPALoss(NamedTuple):
    """``loss = (1 - lambda) * prediction + lambda * sigreg``; the terms are unweighted."""

    loss: torch.Tensor
    prediction: torch.Tensor  # mean over views, images and dimensions of (mu_n - z_{n,v})^2
    sigreg: torch.Tensor  # Epps-Pulley statistic averaged over directions and views


def epps_pulley_knots(t_max: float = 5.0, num_knots: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    """Knots ``t >= 0`` and weights of the trapezoid rule on ``num_knots`` equally spaced points of [-t_max, t_max],
    folded onto [0, t_max]: the integrand is even in ``t`` (the ECF at -t is the conjugate of the ECF at t), so
    ``t = 0`` keeps its weight ``dt`` and every other knot counts twice (Algorithm 1 integrates the whole grid)."""
    if num_knots < 3 or num_knots % 2 == 0:
        raise ValueError(
            f"num_knots must be an odd number >= 3 (the grid on [-t_max, t_max] holds t = 0), got {num_knots}"
        )
    if t_max <= 0:
        raise ValueError(f"t_max must be positive, got {t_max}")
    t = torch.linspace(0.0, t_max, num_knots // 2 + 1, dtype=torch.float64)
    dt = 2 * t_max / (num_knots - 1)
    weights = torch.full_like(t, 2 * dt)
    weights[0] = weights[-1] = dt
    return t, weights


def epps_pulley(samples: torch.Tensor, t_max: float = 5.0, num_knots: int = 17) -> torch.Tensor:
    """The Epps-Pulley statistic of ``samples`` (..., N) against N(0, 1), one value per leading index (...).

    ``EP = N * int |phi_N(t) - exp(-t^2/2)|^2 w(t) dt`` with the empirical characteristic function
    ``phi_N(t) = mean_n exp(i t x_n)`` and the weight ``w(t) = exp(-t^2/2)`` of the paper's Algorithm 1 (its
    ``exp_f`` is both the target CF and the window), integrated by the trapezoid rule on ``num_knots`` knots
    of [-t_max, t_max] (17 on [-5, 5]). Under DDP ``N`` is the global batch: the sums of ``cos(t x)`` and
    ``sin(t x)`` are all-reduced with gradient, so every rank computes the statistic of one process on the
    full batch (every rank must pass the same N). Computed in float32 or wider. For i.i.d. N(0, 1) samples
    ``E[EP] = int (1 - exp(-t^2)) exp(-t^2/2) dt = sqrt(2 pi) - sqrt(2 pi / 3)``, about 1.06, whatever N; it
    grows like N for any other distribution (a collapse to one point: about 0.41 N).
    """
    t, weights = epps_pulley_knots(t_max, num_knots)
    x = float32_or_wider(samples)
    t, weights = t.to(x), weights.to(x)
    target = torch.exp(-0.5 * t.square())  # the CF of N(0, 1), real and even
    total = samples.shape[-1] * world_size()
    xt = x.unsqueeze(-1) * t  # (..., N, T)
    sums = all_reduce_sum_with_grad(torch.stack([xt.cos().sum(-2), xt.sin().sum(-2)]))  # (2, ..., T)
    real, imag = sums[0] / total, sums[1] / total
    err = (real - target).square() + imag.square()
    return total * (err * target) @ weights


def slice_directions(dim: int, num_slices: int, generator: torch.Generator) -> torch.Tensor:
    """``num_slices`` random unit directions of R^dim, as the columns of a (dim, num_slices) matrix, drawn from
    ``generator`` on its device (Gaussian columns normalized: uniform on the sphere). Seed the generator the same
    way on every rank (e.g. from the step) so that all ranks test the same projections."""
    if num_slices < 1:
        raise ValueError(f"num_slices must be at least 1, got {num_slices}")
    directions = torch.randn(dim, num_slices, generator=generator, device=generator.device)
    return directions / directions.norm(dim=0, keepdim=True)


def sigreg(embeddings: torch.Tensor, directions: torch.Tensor, t_max: float = 5.0, num_knots: int = 17) -> torch.Tensor:
    """SIGReg (sec. 4.2, Algorithm 1): ``mean_v mean_a EP({a^T z_{n,v}}_n)`` for embeddings (V, N, K) of ``V``
    views (or (N, K), one view) and unit directions ``a`` (K, M): each view's batch is tested on its own and the
    statistics are averaged over directions and views (LeJEPA's ``lambda / V sum_v SIGReg``)."""
    if embeddings.ndim == 2:
        embeddings = embeddings.unsqueeze(0)
    if embeddings.ndim != 3 or embeddings.shape[-1] != directions.shape[0]:
        raise ValueError(
            f"sigreg expects embeddings (V, N, K) and directions (K, M), got {tuple(embeddings.shape)} and "
            f"{tuple(directions.shape)}"
        )
    with torch.autocast(embeddings.device.type, enabled=False):
        projections = float32_or_wider(embeddings) @ float32_or_wider(directions)  # (V, N, M)
        return epps_pulley(projections.transpose(1, 2), t_max, num_knots).mean()


def lejepa_prediction_loss(embeddings: torch.Tensor, num_global: int) -> torch.Tensor:
    """The predictive loss (eq. 7, Algorithm 2): every view of an image predicts the mean ``mu_n`` of its
    ``num_global`` global views, ``mean_{v,n,k} (mu_{n,k} - z_{n,v,k})^2`` over embeddings (V, N, K) whose first
    ``num_global`` views are the global ones. Eq. 7 writes the squared norm; Algorithm 2 and the official code
    also average over the K dimensions (``.square().mean()``), the normalization the paper's lambda goes with.
    No stop-gradient: ``mu_n`` is trained too. A mean over this rank's images (DDP averages the gradients), in
    float32 or wider."""
    embeddings = float32_or_wider(embeddings)
    centers = embeddings[:num_global].mean(dim=0)
    return (centers - embeddings).square().mean()


def lejepa_loss(
    embeddings: torch.Tensor,
    num_global: int,
    directions: torch.Tensor,
    sigreg_weight: float = 0.05,
    t_max: float = 5.0,
    num_knots: int = 17,
) -> LeJEPALoss:
    """``(1 - lambda) * prediction + lambda * SIGReg`` (eq. 8) over the projector's embeddings (V, N, K) of
    ``V >= 2`` views, the ``num_global`` global ones first. SIGReg sees every view, global and local."""
    views = embeddings.shape[0] if embeddings.ndim == 3 else 0
    if views < 2:
        raise ValueError(f"lejepa_loss needs embeddings (V, N, K) of at least 2 views, got {tuple(embeddings.shape)}")
    if not 1 <= num_global <= views:
        raise ValueError(f"num_global must lie in [1, {views}] (the number of views), got {num_global}")
    if not 0.0 <= sigreg_weight <= 1.0:
        raise ValueError(f"sigreg_weight (lambda) must lie in [0, 1], got {sigreg_weight}")
    prediction = lejepa_prediction_loss(embeddings, num_global)
    regularizer = sigreg(embeddings, directions, t_max, num_knots)
    loss = (1.0 - sigreg_weight) * prediction + sigreg_weight * regularizer
    return LeJEPALoss(loss, prediction, regularizer)

