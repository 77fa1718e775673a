"""InfoNCE losses of MoCo: with a queue of negatives (He et al. 2020, "Momentum Contrast for Unsupervised
Visual Representation Learning", Algorithm 1) and with the global batch as negatives (Chen, Xie, He 2021,
"An Empirical Study of Training Self-Supervised Vision Transformers", Algorithm 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import gather_with_grad, rank
from ssl_lightning.losses.dcl import ContrastiveLoss, contrastive_loss_on_logits


def _float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is in a narrower float (bf16/fp16): a bf16 matmul of unit vectors divided by a small
    temperature puts ~1% errors in the logits' gradients. Float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def infonce_queue_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2,
                       loss: ContrastiveLoss = "nt_xent", sigma: float = 0.5) -> torch.Tensor:
    """MoCo's InfoNCE: query ``q[i]`` against its key ``k[i]`` (positive) and the ``queue`` rows (negatives).

    ``q`` and ``k`` (N, D) are normalized here; the ``queue`` (K, D) holds normalized keys. The keys and the
    queue are constants in MoCo: the caller computes ``k`` without gradient (momentum encoder). The loss
    is local to the rank (each rank's queries against the shared queue), as in the paper. ``loss``: ``dcl``
    drops the positive from the denominator, ``dclw`` also weights it (``dcl.von_mises_fisher_weights`` of
    the (q, k) pairs, averaged over the global batch).
    """
    if q.shape != k.shape or q.ndim != 2 or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"infonce_queue_loss expects q, k of shape (N, D) and a queue (K, D), got {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(queue.shape)}"
        )
    with torch.autocast(q.device.type, enabled=False):  # float32 logits under bf16/fp16 autocast
        q, k = F.normalize(_float32(q), dim=1), F.normalize(_float32(k), dim=1)
        positives = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        negatives = q @ queue.to(q.dtype).T  # (N, K)
        logits = torch.cat([positives, negatives], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
        return contrastive_loss_on_logits(loss, logits, labels, q, k, sigma)


def moco_v3_contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2,
                             loss: ContrastiveLoss = "nt_xent", sigma: float = 0.5) -> torch.Tensor:
    """MoCo v3's ``ctr(q, k)``: query ``q[i]`` against the keys of the global batch, its own key positive.

    Keys are gathered from all ranks in rank order (with gradient, should ``k`` require it), so a DDP run
    gives the loss and gradients of one process on the full batch. Scaled by ``2 * temperature`` as in the
    paper's Algorithm 1. ``loss``: ``dcl`` / ``dclw`` as ``infonce_queue_loss``.
    """
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"moco_v3_contrastive_loss expects q and k of one shape (N, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    with torch.autocast(q.device.type, enabled=False):  # float32 logits under bf16/fp16 autocast
        q, k = F.normalize(_float32(q), dim=1), F.normalize(_float32(k), dim=1)
        keys = gather_with_grad(k)  # (N_global, D)
        logits = q @ keys.T / temperature  # (N, N_global)
        labels = rank() * q.shape[0] + torch.arange(q.shape[0], device=q.device)
        return contrastive_loss_on_logits(loss, logits, labels, q, k, sigma) * (2 * temperature)


def moco_v3_loss(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, temperature: float = 0.2,
    loss: ContrastiveLoss = "nt_xent", sigma: float = 0.5,
) -> torch.Tensor:
    """The symmetrized MoCo v3 loss ``ctr(q1, k2) + ctr(q2, k1)``: queries of one view, keys of the other."""
    return (moco_v3_contrastive_loss(q1, k2, temperature, loss, sigma)
            + moco_v3_contrastive_loss(q2, k1, temperature, loss, sigma))
