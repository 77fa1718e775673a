"""Blockwise masks of BEiT (Bao et al. 2022, "BEiT: BERT Pre-Training of Image Transformers", algorithm 1) as iBOT
uses them (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer", sec. 3.2 and appendix): a
random share of the images is masked, each with its own ratio drawn from a range, by rectangles of random area
and aspect ratio laid down until the image's budget of patches is reached.

Per image the algorithm is the reference's rejection loop: draw a rectangle (area uniform between
``(min(H, W) // 3) ** 2`` patches and the patches still to mask, log-uniform aspect ratio, uniform position); keep
it if it fits the grid and adds between 1 and the remaining budget of new patches; stop once the budget is met or
after ``max_attempts`` rejections in a row. The loop is sequential per image, so it is run in LOCKSTEP over the
batch: each round draws one candidate rectangle for every image still masking (one ``torch.rand`` call), tests
and paints all of them with tensor operations, and an image that is done ignores later rounds. Every image thus
follows the reference's process, with no Python loop over images. It runs on the CPU with a CPU generator (small
tensors, ~tens of rounds, no device synchronisation per round); the caller moves the mask to the device in one
transfer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def mask_ratios(
    num_images: int, ratio_range: tuple[float, float], probability: float, generator: torch.Generator
) -> torch.Tensor:
    """(num_images,) share of patches to mask per image: 0 with probability ``1 - probability`` (the image is not
    masked), else uniform in ``ratio_range``. iBOT's ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`` is
    ``ratio_range=(0.1, 0.5), probability=0.5``; a fixed ratio is ``(r, r)``."""
    low, high = ratio_range
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"mask_ratio must be a range (low, high) with 0 < low <= high < 1, got {tuple(ratio_range)}")
    if not 0.0 < probability <= 1.0:
        raise ValueError(f"mask_probability must lie in (0, 1], got {probability}")
    draws = torch.rand(num_images, 2, generator=generator, device=generator.device)
    ratios = low + (high - low) * draws[:, 0]
    return torch.where(draws[:, 1] < probability, ratios, torch.zeros_like(ratios))


def block_masks(
    ratios: torch.Tensor,
    grid: tuple[int, int],
    generator: torch.Generator,
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 10,
) -> torch.Tensor:
    """(B, H * W) bool masks, True on masked patches, in row-major patch order, for the ``ratios`` (B,) of
    ``mask_ratios`` on a grid of ``grid = (H, W)`` patches. Image ``i`` gets at most ``ratios[i] * H * W`` masked
    patches (usually close to it), as rectangles; a ratio of 0 leaves it unmasked. Drawn on ``generator``'s
    device (the CPU, see the module's docstring)."""
    rows_count, cols_count = grid
    low_aspect, high_aspect = aspect_ratio
    if not 0.0 < low_aspect <= high_aspect:
        raise ValueError(f"mask_aspect_ratio must be a range (low, high) with 0 < low <= high, got {tuple(aspect_ratio)}")
    device = generator.device
    batch = ratios.shape[0]
    budget = ratios.to(device, torch.float64) * rows_count * cols_count  # the reference's ``high``
    min_area = float((min(rows_count, cols_count) // 3) ** 2)
    log_low, log_high = math.log(low_aspect), math.log(high_aspect)
    rows = torch.arange(rows_count, device=device).view(1, -1, 1)
    cols = torch.arange(cols_count, device=device).view(1, 1, -1)

    mask = torch.zeros(batch, rows_count, cols_count, dtype=torch.bool, device=device)
    count = torch.zeros(batch, dtype=torch.float64, device=device)
    failures = torch.zeros(batch, dtype=torch.long, device=device)
    active = count < budget
    # each accepted rectangle adds >= 1 patch and follows < max_attempts rejections: a bound on the rounds
    for _ in range(max_attempts * (rows_count * cols_count + 1)):
        if not bool(active.any()):
            break
        u = torch.rand(batch, 4, generator=generator, device=device, dtype=torch.float64)
        remaining = budget - count
        area = min_area + u[:, 0] * (remaining - min_area)  # uniform between min_area and remaining
        aspect = torch.exp(log_low + u[:, 1] * (log_high - log_low))
        height = torch.round(torch.sqrt(area * aspect)).long()
        width = torch.round(torch.sqrt(area / aspect)).long()
        fits = (height < rows_count) & (width < cols_count)
        top = (u[:, 2] * (rows_count - height + 1).clamp(min=1)).long().view(-1, 1, 1)
        left = (u[:, 3] * (cols_count - width + 1).clamp(min=1)).long().view(-1, 1, 1)
        rectangle = (
            (rows >= top) & (rows < top + height.view(-1, 1, 1)) & (cols >= left) & (cols < left + width.view(-1, 1, 1))
        )
        new = (rectangle & ~mask).sum(dim=(1, 2))
        accept = active & fits & (new > 0) & (new <= remaining)
        mask |= rectangle & accept.view(-1, 1, 1)
        count += torch.where(accept, new, 0)
        failures = torch.where(accept, 0, failures + 1)
        active = active & (count < budget) & (failures < max_attempts)
    return mask.flatten(1)


def blockwise_mask(
    num_images: int,
    grid: tuple[int, int],
    ratio_range: tuple[float, float],
    probability: float,
    generator: torch.Generator,
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """``block_masks(mask_ratios(...))``: (num_images, H * W) bool iBOT masks drawn from ``generator``."""
    ratios = mask_ratios(num_images, ratio_range, probability, generator)
    return block_masks(ratios, grid, generator, aspect_ratio)


class PatchMasks(NamedTuple):
    """The masks of a step's global crops, on the training device.

    mask: (2B, N) bool, True on the patches the student sees masked (crop-major: crop 0's images, then crop 1's).
    rows: (M,) the masked patches' indices in the flattened (2B * N) patch tokens, in row-major order.
    weights: (M,) the patch loss's weight of each masked patch (``losses.ibot.masked_patch_weights``).
    All three are made on the CPU, where the masks are drawn, and moved in one transfer each (no sync).
    """

    mask: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor
