"""Balanced label fractions for semi-supervised evaluation (the 1% / 10% protocol of Chen et al. 2020,
"A Simple Framework for Contrastive Learning of Visual Representations", section 4.2).

Unlike SimCLR's fixed ImageNet lists, the subsets here are drawn: the same number of images from every
class, chosen by a seeded generator, so a seed always gives the same subset and different seeds differ.
"""

from __future__ import annotations

from typing import Optional

import torch


def images_per_class(num_images: int, num_classes: int, fraction: float) -> int:
    """``round(fraction * num_images / num_classes)``, at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * num_images / num_classes))


def label_fraction_indices(
    labels: torch.Tensor, fraction: float, seed: int, num_classes: Optional[int] = None
) -> torch.Tensor:
    """Sorted indices of a balanced subset holding ``images_per_class(N, C, fraction)`` images per class.

    ``labels`` (N,) are class indices in ``[0, C)``; ``C`` is ``num_classes`` or, when None, one more than
    the largest label. Raises ValueError when a class has fewer images than the subset needs (or none).
    """
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    labels = labels.long().cpu()
    if int(labels.min()) < 0:
        raise ValueError("labels must be >= 0: a label fraction needs labeled images (found -1, 'no label')")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} is out of range for num_classes={num_classes}")
    per_class = images_per_class(labels.numel(), num_classes, fraction)
    counts = torch.bincount(labels, minlength=num_classes)
    short = [(c, int(n)) for c, n in enumerate(counts.tolist()) if n < per_class]
    if short:
        listed = ", ".join(f"class {c}: {n}" for c, n in short[:5])
        raise ValueError(
            f"label fraction {fraction} needs {per_class} images per class, but some classes have fewer ({listed})"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values
