"""The warm-up + cosine schedule of a real run follows the real optimizer steps per epoch and the real run
length, whether ``max_epochs`` or ``max_steps`` sets it (issue 10: with ``max_steps`` the whole run was warm-up)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from ssl_lightning.methods import SSLMethod
from ssl_lightning.optim import OptimConfig
from tests.tiny_methods import BACKBONE, one_thread, tiny_data  # noqa: F401  (one_thread: autouse fixture)

NUM_SAMPLES, BATCH = 40, 8  # 5 batches per epoch (drop_last)
BASE_LR, MIN_RATIO = 0.4, 0.1  # SGD, scale_lr "none"


class SquaredFeatures(SSLMethod):
    """The smallest method: the mean squared feature of the first view."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        features = self(batch["views"][0])
        return {"loss": features.pow(2).mean(), "features": features.detach()}


class LearningRates(Callback):
    """The learning rate of the first parameter group at every optimizer step, and the one left at the end."""

    def __init__(self) -> None:
        self.used: list[float] = []
        self.final: float | None = None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        self.used.append(optimizer.param_groups[0]["lr"])

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.final = trainer.optimizers[0].param_groups[0]["lr"]


def reference_lr(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to BASE_LR over ``warmup`` steps, then a half cosine to MIN_RATIO * BASE_LR at ``total``."""
    if step < warmup:
        return BASE_LR * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return BASE_LR * (MIN_RATIO + (1 - MIN_RATIO) * (1 + math.cos(math.pi * progress)) / 2)


def run(tmp_path: Path, warmup_epochs: float, **trainer_kwargs: Any) -> LearningRates:
    seed_everything(0, verbose=False)
    optim = OptimConfig(name="sgd", lr=BASE_LR, scale_lr="none", warmup_epochs=warmup_epochs, min_lr_ratio=MIN_RATIO)
    model = SquaredFeatures(**BACKBONE, optim=optim)
    rates = LearningRates()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[rates],
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=tiny_data(num_samples=NUM_SAMPLES, batch_size=BATCH))
    return rates


@pytest.mark.parametrize(
    ("trainer_kwargs", "warmup_epochs", "steps_per_epoch", "total"),
    [
        ({"max_steps": 12}, 1, 5, 12),  # the bug: max_epochs is -1, the whole run was warm-up
        ({"max_steps": 12, "max_epochs": -1}, 1.5, 5, 12),
        ({"max_epochs": 3}, 1, 5, 15),
        ({"max_epochs": 10, "max_steps": 8}, 1, 5, 8),  # the shorter limit ends the run
        ({"max_steps": 7, "accumulate_grad_batches": 2}, 1, 3, 7),  # ceil(5 / 2) steps per epoch
        ({"max_epochs": 2, "accumulate_grad_batches": 2}, 1, 3, 6),
        ({"max_steps": 9, "limit_train_batches": 3}, 2, 3, 9),
    ],
)
def test_warmup_and_cosine_follow_the_real_steps(
    tmp_path: Path, trainer_kwargs: dict[str, Any], warmup_epochs: float, steps_per_epoch: int, total: int
) -> None:
    rates = run(tmp_path, warmup_epochs, **trainer_kwargs)
    warmup = round(warmup_epochs * steps_per_epoch)
    assert len(rates.used) == total
    expected = [reference_lr(step, warmup, total) for step in range(total)]
    assert rates.used == pytest.approx(expected, rel=1e-9)
    assert max(rates.used) == pytest.approx(BASE_LR) and rates.used.index(max(rates.used)) == warmup - 1
    assert rates.final == pytest.approx(MIN_RATIO * BASE_LR)  # the schedule ends at min_lr_ratio x base lr


def test_infinite_run_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_epochs or trainer.max_steps"):
        run(tmp_path, 1, max_epochs=-1, max_steps=-1, limit_train_batches=2)
