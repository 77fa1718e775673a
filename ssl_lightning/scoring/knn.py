"""Weighted k-nearest-neighbour classifier on cosine similarity (Wu et al. 2018, InstDisc).

The monitor used by SimCLR/MoCo-style code: each of the ``k`` most similar bank features votes for its
label with weight ``exp(sim / T)``; the class with the largest summed weight wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.scoring.metrics import topk_accuracy


def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores ``(Q, num_classes)`` for ``query (Q, D)`` against ``bank (N, D)``.

    Features are L2-normalized here; ``k`` is clipped to ``N``; queries are processed ``chunk_size``
    at a time so the similarity matrix never exceeds ``chunk_size x N``. Labels must be in
    ``[0, num_classes)``.
    """
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for chunk in F.normalize(query.float(), dim=1).split(chunk_size):
        sim, idx = (chunk @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        chunk_scores = weights.new_zeros(chunk.shape[0], num_classes)
        scores.append(chunk_scores.scatter_add_(1, bank_labels[idx], weights))
    return torch.cat(scores)


def knn_accuracy(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of :func:`knn_predict` in percent (top-5 is top-``num_classes`` below 5 classes)."""
    scores = knn_predict(query, bank, bank_labels, num_classes, k, temperature)
    return topk_accuracy(scores, query_labels, 1), topk_accuracy(scores, query_labels, 5)
