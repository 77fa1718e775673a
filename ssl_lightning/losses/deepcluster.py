"""DeepCluster-v2's loss (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", appendix on DeepCluster-v2): every crop's prototype scores predict the k-means cluster of its image,
for each head of prototypes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def deepcluster_loss(scores: Sequence[Sequence[torch.Tensor]], targets: torch.Tensor,
                     temperature: float = 0.1) -> torch.Tensor:
    """``mean_h mean_v mean_i -log softmax(scores[h][v]_i / temperature)[targets[h, i]]``.

    ``scores[h][v]`` (B, K_h) are crop ``v``'s cosine scores against head ``h``'s prototypes (with gradient);
    ``targets`` (H, B) the cluster of each image in each head (every crop of an image shares it). Averaged over
    this rank's images: equal batches per rank and DDP's gradient average give one process's gradients.
    """
    if not scores or len(scores) != targets.shape[0] or targets.ndim != 2:
        raise ValueError(f"deepcluster_loss needs one row of targets per head, got {len(scores)} heads and targets "
                         f"of shape {tuple(targets.shape)}")
    loss = targets.new_zeros((), dtype=torch.float32)
    for head_scores, head_targets in zip(scores, targets):
        if not head_scores or any(s.ndim != 2 or s.shape[0] != head_targets.shape[0] for s in head_scores):
            raise ValueError(f"deepcluster_loss expects (B, K) scores per crop with B = {head_targets.shape[0]}, got "
                             f"{[tuple(s.shape) for s in head_scores]}")
        crops = [F.cross_entropy(s.float() / temperature, head_targets) for s in head_scores]
        loss = loss + sum(crops) / len(crops)
    return loss / len(scores)
