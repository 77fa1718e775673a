"""Rotations for rotation prediction (Gidaris, Singh, Komodakis 2018, "Unsupervised Representation
Learning by Predicting Image Rotations"): the network classifies which of four rotations was applied."""

from __future__ import annotations

import torch

NUM_ROTATIONS = 4  # 0, 90, 180 and 270 degrees


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image in all four rotations (the paper found this better than one random rotation per image).

    (B, C, S, S) -> images (4B, C, S, S) and labels (4B,): rows ``k*B .. (k+1)*B - 1`` hold the batch
    rotated by ``k`` quarter turns (``torch.rot90(x, k, dims=(-2, -1))``, counter-clockwise) with label
    ``k``; rows ``0 .. B - 1`` are the unmodified batch.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotate_batch needs square images shaped (B, C, S, S), got shape {tuple(images.shape)}")
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels
