"""Feature extraction from a model over an evaluation loader."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: Iterable[dict], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over batches ``{"image", "label"}``.

    Returns float32 features ``(N, D)`` and long labels ``(N,)`` on ``device``. The train/eval flag of
    every submodule is restored afterwards (a frozen target kept in eval mode stays in eval mode).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    features, labels = [], []
    try:
        for batch in loader:
            features.append(model(batch["image"].to(device, non_blocking=True)).float())
            labels.append(batch["label"].to(device, non_blocking=True).long())
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat(features), torch.cat(labels)
