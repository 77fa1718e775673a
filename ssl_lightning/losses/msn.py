"""MSN's loss (Assran et al. 2022, "Masked Siamese Networks for Label-Efficient Learning", sec. 3, eq. 1-2) and
PMSN's prior (Assran et al. 2023, "The Hidden Uniform Cluster Prior in Self-Supervised Learning", sec. 5).

Each anchor view predicts soft assignments ``p = softmax(cos(z, q) / tau)`` over K learnable prototypes ``q``; the
target is the EMA encoder's assignment of the unmasked view, sharpened (``p+ ** (1 / T)`` renormalised). The loss
is the cross-entropy ``H(p+, p)`` averaged over anchors plus ``lambda * KL(p_bar || prior)``, where ``p_bar`` is
the mean anchor prediction over the GLOBAL batch. With the uniform prior ``KL(p_bar || U) = log K - H(p_bar)``,
MSN's mean-entropy maximisation (me-max); PMSN puts a power law ``prior_k ~ k ** -tau`` in its place.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import all_reduce_sum_, all_reduce_sum_with_grad
from ssl_lightning.losses.swav import sinkhorn_knopp


class MSNTerms(NamedTuple):
    loss: torch.Tensor  # cross_entropy + regularization_weight * regularizer
    cross_entropy: torch.Tensor  # H(p+, p), mean over this rank's anchors
    regularizer: torch.Tensor  # KL(p_bar || prior) of the global batch (log K - H(p_bar) for the uniform prior)


def prototype_logits(embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """``cos(z_i, q_k) / temperature`` (N, K): embeddings (N, D) and prototypes (K, D) both L2-normalised; in
    float32 with autocast off (a bf16 cosine divided by 0.025 would move a target logit by ~0.1)."""
    with torch.autocast(embeddings.device.type, enabled=False):
        return F.normalize(embeddings.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T / temperature


def sharpen(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p ** (1 / T) / sum_k p_k ** (1 / T)`` along the last dimension (computed as a softmax of ``log p / T``:
    the same numbers, without the underflow of ``p ** 4`` in float32)."""
    if temperature <= 0:
        raise ValueError(f"the sharpening temperature must be positive, got {temperature}")
    return torch.softmax(probabilities.log() / temperature, dim=-1)


def power_law_prior(num_prototypes: int, exponent: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """PMSN's prior over the K prototypes: ``k ** -exponent / sum_j j ** -exponent`` for k = 1..K
    (``exponent = 0`` is the uniform prior)."""
    ranks = torch.arange(1, num_prototypes + 1, dtype=torch.float64, device=device)
    prior = ranks ** -exponent
    return (prior / prior.sum()).float()


def global_mean(probabilities: torch.Tensor) -> torch.Tensor:
    """The mean (K,) of the rows of ``probabilities`` (N, K) over ALL ranks, with gradient to this rank's rows
    (one process on the concatenated batch computes the same value; DDP's gradient averaging then gives its
    gradient)."""
    count = all_reduce_sum_(probabilities.new_tensor(float(probabilities.shape[0])))
    return all_reduce_sum_with_grad(probabilities.sum(dim=0)) / count


def prior_kl(mean_probabilities: torch.Tensor, prior: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``KL(p_bar || prior) = sum_k p_bar_k log(p_bar_k / prior_k)``; ``prior=None`` is the uniform prior, where it
    equals me-max's ``log K - H(p_bar)`` (the reference code's regulariser, 0 for a uniform ``p_bar``)."""
    entropy = -torch.special.xlogy(mean_probabilities, mean_probabilities).sum()
    if prior is None:
        return math.log(mean_probabilities.shape[-1]) - entropy
    return -entropy - (mean_probabilities * prior.to(mean_probabilities).log()).sum()


@torch.no_grad()
def msn_targets(
    targets: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: float = 0.1,
    sharpen_temperature: float = 0.25,
    sinkhorn_iterations: int = 0,
) -> torch.Tensor:
    """The target view's sharpened assignments ``p+`` (B, K) (no gradient), optionally balanced over the global
    batch by Sinkhorn-Knopp as the reference code's ``use_sinkhorn`` (its sums all-reduced across ranks)."""
    probabilities = sharpen(torch.softmax(prototype_logits(targets, prototypes, temperature), -1),
                            sharpen_temperature)
    if sinkhorn_iterations > 0:  # Sinkhorn-Knopp on the probabilities themselves: exp(log p / 1)
        probabilities = sinkhorn_knopp(probabilities.log(), epsilon=1.0, iterations=sinkhorn_iterations)
    return probabilities


def msn_loss(
    anchors: torch.Tensor,
    targets: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: float = 0.1,
    target_temperature: float = 0.1,
    sharpen_temperature: float = 0.25,
    regularization_weight: float = 1.0,
    prior: Optional[torch.Tensor] = None,
    sinkhorn_iterations: int = 0,
) -> MSNTerms:
    """MSN's objective (eq. 2) for anchors (V, B, D) (V anchor views of B images: masked and focal views) and the
    target view's embeddings (B, D) of the same B images.

    ``p = softmax(cos(anchor, q) / temperature)``; ``p+ = sharpen(softmax(cos(target, q) / target_temperature),
    sharpen_temperature)`` without gradient (the reference code: both softmaxes at 0.1 and T = 0.25, i.e. the
    paper's target temperature ``tau+ = 0.1 * 0.25 = 0.025``). The cross-entropy ``-sum_k p+_k log p_k`` is
    averaged over this rank's V x B anchors; the regulariser is ``KL(p_bar || prior)`` of the mean ``p_bar`` of
    every rank's anchors (``prior=None``: uniform, me-max). Computed in float32.
    """
    if anchors.ndim != 3 or targets.ndim != 2 or anchors.shape[1:] != targets.shape:
        raise ValueError(f"msn_loss expects anchors (V, B, D) and targets (B, D), got {tuple(anchors.shape)} and "
                         f"{tuple(targets.shape)}")
    target_probabilities = msn_targets(targets, prototypes, target_temperature, sharpen_temperature, sinkhorn_iterations)
    log_probabilities = torch.log_softmax(prototype_logits(anchors, prototypes, temperature), dim=-1)
    cross_entropy = -(target_probabilities * log_probabilities).sum(dim=-1).mean()  # p+ broadcast over the V views
    regularizer = prior_kl(global_mean(log_probabilities.exp().flatten(0, 1)), prior)
    return MSNTerms(cross_entropy + regularization_weight * regularizer, cross_entropy, regularizer)
