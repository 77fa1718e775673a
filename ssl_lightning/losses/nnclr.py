"""NNCLR (Dwibedi et al. 2021, "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of
Visual Representations", eq. 2): each view's positive is its nearest neighbour in a support set of past
embeddings, contrasted with the other view's predictions across the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import gather_with_grad, rank


@torch.no_grad()
def nearest_neighbours(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``NN(z_i, Q) = argmax_{q in Q} cos(z_i, q)`` for every row of ``z`` (N, D) against the support set
    ``support`` (Q, D) of normalized embeddings: the rows of ``support`` found (no gradient)."""
    if z.ndim != 2 or support.ndim != 2 or z.shape[1] != support.shape[1]:
        raise ValueError(f"nearest_neighbours expects z (N, D) and a support set (Q, D), got {tuple(z.shape)} and {tuple(support.shape)}")
    similarity = F.normalize(z.float(), dim=1) @ support.float().T
    return support[similarity.argmax(dim=1)]


def nnclr_loss(neighbours: torch.Tensor, predictions: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``mean_i -log exp(NN(z_i) . p_i+ / t) / sum_k exp(NN(z_i) . p_k+ / t)``: each local neighbour against the
    OTHER view's predictions ``p+`` of the global batch (gathered with gradient, rank order; its own image's
    positive), both normalized. A DDP run gives one process's loss and gradients on the full batch."""
    if neighbours.shape != predictions.shape or neighbours.ndim != 2:
        raise ValueError(f"nnclr_loss expects neighbours and predictions of one shape (N, D), got "
                         f"{tuple(neighbours.shape)} and {tuple(predictions.shape)}")
    with torch.autocast(predictions.device.type, enabled=False):  # float32 logits under bf16/fp16 autocast
        anchors = F.normalize(neighbours.float(), dim=1)
        candidates = gather_with_grad(F.normalize(predictions.float(), dim=1))
        logits = anchors @ candidates.T / temperature
        labels = rank() * anchors.shape[0] + torch.arange(anchors.shape[0], device=anchors.device)
        return F.cross_entropy(logits, labels)
