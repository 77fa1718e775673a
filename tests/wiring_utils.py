"""Fixed training batches and ``training_step`` under a stub trainer, for tests that recompute a method's loss
from its parts (issue 11, "method wiring")."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch import LightningModule


def fixed_views(
    batch: int, size: int, num_views: int = 2, num_local: int = 0, local_size: int = 0, seed: int = 0
) -> dict[str, Any]:
    """A training batch as in docs/CONTRACTS.md, the same for a given ``seed`` whatever the global RNG:
    ``num_views`` global views (batch, 3, size, size), then ``num_local`` local views (batch, 3, local_size,
    local_size), and labels 0..9."""
    if num_local and local_size <= 0:
        raise ValueError(f"fixed_views: num_local={num_local} needs a positive local_size, got {local_size}")
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, size, size, generator=generator) for _ in range(num_views)]
    views += [torch.randn(batch, 3, local_size, local_size, generator=generator) for _ in range(num_local)]
    return {"views": views, "label": torch.arange(batch) % 10}


def stub_trainer(**attributes: Any) -> SimpleNamespace:
    """What a method's ``training_step`` may read from ``self.trainer`` on one process at step 0;
    ``attributes`` override (e.g. ``global_step=5``, ``current_epoch=1``, ``datamodule=...``)."""
    defaults: dict[str, Any] = {
        "global_step": 0, "current_epoch": 0, "global_rank": 0, "local_rank": 0, "world_size": 1,
        "accumulate_grad_batches": 1, "training": True, "testing": False, "sanity_checking": False,
        "datamodule": None, "optimizers": [],
    }
    return SimpleNamespace(**{**defaults, **attributes})


def run_training_step(
    model: LightningModule, batch: dict[str, Any], batch_idx: int = 0, **trainer_attributes: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``model.training_step(batch, batch_idx)`` with a ``stub_trainer(**trainer_attributes)`` attached and
    ``self.log`` recording instead of logging. Returns the step's output and ``{name: logged value}``
    (tensors detached). The model is left without trainer and with its own ``log`` afterwards."""
    logged: dict[str, Any] = {}

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        logged[name] = value.detach() if isinstance(value, torch.Tensor) else value

    previous = model._trainer
    model._trainer = stub_trainer(**trainer_attributes)
    model.log = log  # type: ignore[method-assign]
    try:
        return model.training_step(batch, batch_idx), logged
    finally:
        model._trainer = previous
        del model.log
