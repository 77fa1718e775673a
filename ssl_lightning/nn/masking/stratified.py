"""DINOv2's per-image mask ratios (Oquab et al. 2023; facebookresearch/dinov2, data/collate.py): of a batch of
``n`` global crops exactly ``int(n * probability)`` are masked, the ``i``-th of them with a ratio drawn uniformly
in the ``i``-th of as many equal slices of the ratio range (stratified, so a batch covers the whole range), and
the crops are shuffled. Unlike iBOT's independent draws (``blockwise.mask_ratios``) every batch of ``n >= 1 /
probability`` crops has masked patches, on every rank. The masks themselves are ``blockwise.block_masks``."""

from __future__ import annotations

import torch


def stratified_mask_ratios(
    num_images: int, ratio_range: tuple[float, float], probability: float, generator: torch.Generator
) -> torch.Tensor:
    """(num_images,) share of patches to mask per image, drawn from ``generator`` (on its device): 0 for all but
    ``int(num_images * probability)`` images, which get one ratio in each slice ``[e_i, e_{i+1})`` of
    ``linspace(low, high, masked + 1)``, in a random order over the batch."""
    low, high = ratio_range
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"mask_ratio must be a range (low, high) with 0 < low <= high < 1, got {tuple(ratio_range)}")
    if not 0.0 < probability <= 1.0:
        raise ValueError(f"mask_probability must lie in (0, 1], got {probability}")
    device = generator.device
    masked = int(num_images * probability)
    edges = torch.linspace(low, high, masked + 1, device=device, dtype=torch.float64)
    draws = torch.rand(masked, generator=generator, device=device, dtype=torch.float64)
    ratios = torch.zeros(num_images, device=device, dtype=torch.float64)
    ratios[:masked] = edges[:-1] + draws * (edges[1:] - edges[:-1])
    return ratios[torch.randperm(num_images, generator=generator, device=device)].float()
