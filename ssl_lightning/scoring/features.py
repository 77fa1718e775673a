"""Feature extraction from a model over an evaluation loader."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: Iterable[dict], device: torch.device | str, num_forwards: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over batches ``{"image", "label"}``.

    Returns float32 features ``(N, D)`` and long labels ``(N,)`` on ``device``. The train/eval flag of
    every submodule is restored afterwards (a frozen target kept in eval mode stays in eval mode).
    ``num_forwards``: call ``model`` this many times in all, the last batch again once the loader is done (those
    outputs dropped): every rank of a sharded model must join each forward's all-gathers, whatever its share.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    features, labels = [], []
    images = None
    try:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            features.append(model(images).float())
            labels.append(batch["label"].to(device, non_blocking=True).long())
        for _ in range(len(features), num_forwards or 0):
            if images is None:
                raise ValueError("extract_features: this rank's share of the evaluation set is empty, so it cannot "
                                 "join the other ranks' forwards; use an evaluation set of at least one image per rank")
            model(images)
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat(features), torch.cat(labels)
