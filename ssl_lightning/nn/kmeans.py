"""Spherical k-means across ranks (DeepCluster-v2, Caron et al. 2020, appendix of "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments"): unit vectors go to the centroid of highest cosine, each centroid
becomes the normalized mean of its members. Every rank holds a slice of the points; the centroids' sums and counts
are summed over ranks, so every rank ends with the centroids of one process on all the points."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import all_reduce_sum_


@torch.no_grad()
def nearest_centroids(points: torch.Tensor, centroids: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
    """``argmax_k points_i . centroids_k`` for each row of ``points`` (N, D) against ``centroids`` (K, D), computed
    ``chunk_size`` rows at a time (an ImageNet bank against 3000 centroids would need 15 GB at once)."""
    if points.ndim != 2 or centroids.ndim != 2 or points.shape[1] != centroids.shape[1]:
        raise ValueError(f"nearest_centroids expects points (N, D) and centroids (K, D), got "
                         f"{tuple(points.shape)} and {tuple(centroids.shape)}")
    found = [(chunk @ centroids.T).argmax(dim=1) for chunk in points.split(chunk_size)]
    return torch.cat(found) if found else points.new_zeros(0, dtype=torch.long)


@torch.no_grad()
def spherical_kmeans(points: torch.Tensor, centroids: torch.Tensor, iterations: int = 10,
                     chunk_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` rounds of (assign every point to its nearest centroid; centroid = normalized mean of its
    members), then a last assignment, from the initial ``centroids`` (K, D), which must be the same on every rank.

    ``points`` (N_rank, D) are this rank's unit rows; the sums and counts per centroid are all-reduced, so the
    centroids are the same on every rank and equal one process's on all points. A centroid without members keeps
    its previous position (the official code does the same). Returns the centroids (K, D) and this rank's
    assignments (N_rank,).
    """
    if iterations < 0:
        raise ValueError(f"spherical_kmeans needs iterations >= 0, got {iterations}")
    centroids = centroids.to(points.dtype).clone()
    for _ in range(iterations):
        members = nearest_centroids(points, centroids, chunk_size)
        sums = all_reduce_sum_(torch.zeros_like(centroids).index_add_(0, members, points))
        counts = all_reduce_sum_(torch.bincount(members, minlength=centroids.shape[0]))
        centroids = torch.where((counts > 0).unsqueeze(1), F.normalize(sums, dim=1), centroids)
    return centroids, nearest_centroids(points, centroids, chunk_size)
