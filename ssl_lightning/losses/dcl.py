"""Decoupled contrastive learning (Yeh et al. 2022, "Decoupled Contrastive Learning"): InfoNCE with the positive
pair removed from the denominator (eq. 6, DCL), optionally with the positive term weighted by a von Mises-Fisher
kernel (sec. 4, DCLW). One function for any InfoNCE's logits: SimCLR's (``nt_xent_logits``) and MoCo's."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import all_reduce_max_, all_reduce_sum_

#: the contrastive losses of SimCLR and MoCo v2/v3: the paper's InfoNCE (``nt_xent``), DCL, DCLW
ContrastiveLoss = Literal["nt_xent", "dcl", "dclw"]
CONTRASTIVE_LOSSES = ("nt_xent", "dcl", "dclw")


def decoupled_contrastive_loss(
    logits: torch.Tensor, positive_idx: torch.Tensor, positive_weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``mean_i [ -w_i * l_{i, p_i} + log sum_{k != p_i} exp(l_{i, k}) ]`` over the rows ``i`` of ``logits``
    (similarities already divided by the temperature; an entry to leave out, e.g. an anchor's similarity to
    itself, is ``-inf``). ``positive_idx`` (rows,): each row's positive column; ``positive_weight``: DCLW's
    ``w_i`` (1 for DCL). With the positive added back to the denominator and w = 1 it is the cross-entropy."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    positives = logits[rows, positive_idx]
    negatives = logits.index_put((rows, positive_idx), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
    weight = 1.0 if positive_weight is None else positive_weight
    return (-weight * positives + torch.logsumexp(negatives, dim=1)).mean()


@torch.no_grad()
def von_mises_fisher_weights(a: torch.Tensor, b: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """DCLW's weights ``w_i = 2 - exp(<a_i, b_i> / sigma) / mean_j exp(<a_j, b_j> / sigma)`` of the positive
    pairs (rows of ``a`` and ``b`` L2-normalised here), the mean taken over the GLOBAL batch (all-reduced), no
    gradient: the weights average 1 over the global batch, and harder positive pairs weigh more."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"von_mises_fisher_weights expects two (N, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    scores = (F.normalize(a.float(), dim=1) * F.normalize(b.float(), dim=1)).sum(dim=1) / sigma
    peak = all_reduce_max_(scores.max().clone())  # a shared shift keeps exp finite for any sigma
    kernel = torch.exp(scores - peak)
    totals = all_reduce_sum_(torch.stack([kernel.sum(), torch.tensor(float(kernel.numel()), device=kernel.device)]))
    return 2.0 - kernel / (totals[0] / totals[1])


def contrastive_loss_on_logits(
    loss: ContrastiveLoss, logits: torch.Tensor, positive_idx: torch.Tensor, anchors: torch.Tensor,
    positives: torch.Tensor, sigma: float = 0.5,
) -> torch.Tensor:
    """The ``loss`` named on InfoNCE logits (one row per anchor): ``nt_xent`` the cross-entropy, ``dcl`` the
    decoupled loss, ``dclw`` with the weights of the (anchor, positive) embedding pairs (rows of ``anchors`` and
    ``positives``, before any normalisation)."""
    if loss == "nt_xent":
        return F.cross_entropy(logits, positive_idx)
    if loss not in CONTRASTIVE_LOSSES:
        raise ValueError(f"loss must be one of {', '.join(CONTRASTIVE_LOSSES)}, got {loss!r}")
    weights = von_mises_fisher_weights(anchors, positives, sigma) if loss == "dclw" else None
    return decoupled_contrastive_loss(logits, positive_idx, weights)


def check_contrastive_loss(loss: str, sigma: float) -> None:
    """A method's ``loss`` / ``dclw_sigma`` settings, checked when it is built (one line naming the setting)."""
    if loss not in CONTRASTIVE_LOSSES:
        raise ValueError(f"loss must be one of {', '.join(CONTRASTIVE_LOSSES)}, got {loss!r}")
    if sigma <= 0:
        raise ValueError(f"dclw_sigma must be positive, got {sigma}")
