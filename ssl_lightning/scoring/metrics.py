"""Top-k accuracy of class scores, in percent."""

from __future__ import annotations

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percent of rows of ``scores (N, C)`` whose label is among the ``min(k, C)`` highest scores.

    Ties are broken by ``torch.topk`` (lowest class index first on CPU).
    """
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"expected scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels.to(top.device).unsqueeze(1)).any(dim=1).float().mean().item() * 100.0
