"""I-JEPA's multi-block masks (Assran et al. 2023, sec. 3 and appendix C), drawn for a whole batch at once.

Per image: ``num_targets`` target blocks (rectangles of ``target_scale`` of the patches, aspect ratio height / width
in ``target_aspect``) and one context block (``context_scale``, aspect ``context_aspect``) from which every target
patch is removed. As the reference collator (facebookresearch/ijepa ``src/masks/multiblock.py``), the block SIZES are
drawn once per batch, so every image has the same number of patches in each target block, and the positions per
image and block; every image keeps the same number of context patches, the fewest any image of the batch has.

Where this differs from the reference collator, on purpose:
  * the context patches an image loses to that common count are chosen at random, not the last ones in raster order
    (the reference's truncation always drops bottom-right patches; facebookresearch/ijepa issue 60);
  * a block may touch the last row and column and may span the whole grid (the reference draws the corner with an
    exclusive upper bound and shrinks a full-size block by one; ijepa pull requests 40 and 59);
  * scale and aspect ratio are drawn independently (the reference uses one uniform number for both);
  * the context safeguard (``min_context``): the reference re-draws the context position up to 20 times until it
    keeps more than ``min_keep`` patches, then lets the context overlap targets. Here ``tries`` whole placements
    (targets and context) are drawn at once, and each image takes its first placement whose context keeps at least
    ``min_context`` patches (the rejection sampling of the reference, without a loop), else its fullest one. A
    context never contains a target patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass
class MultiBlockMasks:
    """Patch indices (row-major, ``row * cols + col``) of a batch of multi-block masks.

    Attributes:
        context: (B, n_context) the context patches of each image, ascending.
        targets: (B, num_targets, block_h * block_w) each target block's patches, in raster order.
        target_size: (block_h, block_w) of every target block of the batch.
        context_size: (height, width) of the context block before the targets were removed.
        full_context: (B, N) bool, each image's whole context block minus its targets, before the images were cut
            to the batch's common count (``context`` is a random subset of it).
    """

    context: torch.Tensor
    targets: torch.Tensor
    target_size: tuple[int, int]
    context_size: tuple[int, int]
    full_context: torch.Tensor

    def to(self, device: torch.device) -> MultiBlockMasks:
        """The same masks with their tensors on ``device`` (copied without waiting, from a CPU draw)."""
        return replace(self, context=self.context.to(device, non_blocking=True),
                       targets=self.targets.to(device, non_blocking=True),
                       full_context=self.full_context.to(device, non_blocking=True))


def check_range(values: tuple[float, float], setting: str, upper: float | None = 1.0) -> None:
    """One line naming ``setting`` unless ``0 < values[0] <= values[1] (<= upper)``."""
    low, high = values
    if not (0.0 < low <= high and (upper is None or high <= upper)):
        bound = f"(0, {upper}]" if upper is not None else "(0, inf)"
        raise ValueError(f"{setting} must be an increasing pair in {bound}, got {tuple(values)}")


def block_size(rows: int, cols: int, scale: float, aspect: float) -> tuple[int, int]:
    """(height, width) in patches of a block covering ``scale`` of a ``rows`` x ``cols`` grid with height / width
    ``aspect``, rounded to whole patches and kept within the grid (at least one patch)."""
    area = rows * cols * scale
    height = min(rows, max(1, round(math.sqrt(area * aspect))))
    width = min(cols, max(1, round(math.sqrt(area / aspect))))
    return height, width


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def _block_indices(top: torch.Tensor, left: torch.Tensor, size: tuple[int, int], cols: int) -> torch.Tensor:
    """(..., h * w) patch indices of the blocks with corners ``top``, ``left`` (...), in raster order."""
    height, width = size
    offsets = (torch.arange(height, device=top.device)[:, None] * cols + torch.arange(width, device=top.device)).flatten()
    return (top * cols + left)[..., None] + offsets


def _corners(shape: tuple[int, ...], grid: tuple[int, int], size: tuple[int, int], generator: torch.Generator):
    """Top-left corners, uniform over every position where the block fits (last row and column included)."""
    device = generator.device
    top = torch.randint(0, grid[0] - size[0] + 1, shape, generator=generator, device=device)
    left = torch.randint(0, grid[1] - size[1] + 1, shape, generator=generator, device=device)
    return top, left


def multiblock_masks(
    batch: int,
    grid: tuple[int, int],
    generator: torch.Generator,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    context_aspect: tuple[float, float] = (1.0, 1.0),
    min_context: int = 10,
    tries: int = 20,
) -> MultiBlockMasks:
    """I-JEPA's context and target blocks for ``batch`` images of ``grid`` = (rows, cols) patches, drawn from
    ``generator`` (on the device the indices are made on) with no Python loop over images or tries.

    Raises ValueError (one line) for bad settings, and when some image's context would keep no patch at all
    (targets covering the whole context block in every try: lower ``num_targets`` or ``target_scale``).
    """
    check_range(target_scale, "target_scale")
    check_range(context_scale, "context_scale")
    check_range(target_aspect, "target_aspect", upper=None)
    check_range(context_aspect, "context_aspect", upper=None)
    if num_targets < 1:
        raise ValueError(f"num_targets must be at least 1, got {num_targets}")
    if min_context < 1 or tries < 1:
        raise ValueError(f"min_context and tries must be at least 1, got min_context={min_context}, tries={tries}")
    rows, cols = grid
    num_patches = rows * cols
    device = generator.device

    # 1. the block sizes, once for the batch (the target scale and aspect, then the context scale and aspect)
    target_size = block_size(rows, cols, _uniform(*target_scale, generator), _uniform(*target_aspect, generator))
    context_size = block_size(rows, cols, _uniform(*context_scale, generator), _uniform(*context_aspect, generator))

    # 2. `tries` placements of every image's targets and context at once: (tries, B, ...)
    targets = _block_indices(*_corners((tries, batch, num_targets), grid, target_size, generator), target_size, cols)
    in_target = torch.zeros(tries, batch, num_patches, dtype=torch.bool, device=device)
    in_target.scatter_(2, targets.flatten(2), True)
    top, left = _corners((tries, batch), grid, context_size, generator)
    row = torch.arange(num_patches, device=device) // cols
    col = torch.arange(num_patches, device=device) % cols
    in_context = (
        (row >= top[..., None]) & (row < top[..., None] + context_size[0])
        & (col >= left[..., None]) & (col < left[..., None] + context_size[1])
    )
    context = in_context & ~in_target  # the targets are removed from the context
    counts = context.sum(dim=2)  # (tries, B)

    # 3. each image's first placement whose context keeps min_context patches, else its fullest one
    valid = counts >= min_context
    first_valid = torch.where(valid.any(dim=0), valid.int().argmax(dim=0), counts.argmax(dim=0))  # (B,)
    images = torch.arange(batch, device=device)
    context, targets, counts = context[first_valid, images], targets[first_valid, images], counts[first_valid, images]

    # 4. the same number of context patches in every image: the batch's fewest, the others dropped at random
    keep = int(counts.min())
    if keep == 0:
        raise ValueError(
            f"an image's context keeps no patch after removing {num_targets} targets of {target_size[0]}x{target_size[1]} "
            f"patches from a {context_size[0]}x{context_size[1]} block in {tries} tries: lower num_targets or target_scale"
        )
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    chosen = torch.where(context, noise, 2.0).argsort(dim=1)[:, :keep]  # non-context patches sort last
    return MultiBlockMasks(chosen.sort(dim=1).values, targets, target_size, context_size, context)
