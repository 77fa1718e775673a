"""Tiny methods, data and trainers for the momentum-method tests (16x16 synthetic images, width-4 ResNet)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.methods import BYOL, MoCoV2, MoCoV3, SimSiam, SSLMethod
from ssl_lightning.optim import OptimConfig

BACKBONE = {"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}}
HEADS: dict[type, dict[str, Any]] = {
    MoCoV2: {"projection_hidden_dim": 32, "projection_dim": 16, "queue_size": 24, "momentum": 0.9},
    MoCoV3: {"projection_hidden_dim": 32, "projection_dim": 16, "prediction_hidden_dim": 32},
    BYOL: {"projection_hidden_dim": 32, "projection_dim": 16, "prediction_hidden_dim": 32, "base_momentum": 0.9},
    SimSiam: {"projection_hidden_dim": 32, "projection_dim": 32, "prediction_hidden_dim": 8},
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread; two threads on a loaded 2-core machine are 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_method(cls: type[SSLMethod], seed: int = 0, **kwargs: Any) -> SSLMethod:
    seed_everything(seed, verbose=False)
    optim = OptimConfig(name="sgd", lr=0.5, warmup_epochs=1)
    heads = next(value for method, value in HEADS.items() if issubclass(cls, method))
    return cls(**{**BACKBONE, **heads, "optim": optim, **kwargs})


def tiny_data(num_samples: int = 32, batch_size: int = 8, **kwargs: Any) -> SyntheticData:
    """Seeded explicitly: its order and views do not depend on the global seed of the test."""
    return SyntheticData(num_samples=num_samples, batch_size=batch_size, image_size=16, num_workers=0, seed=0, **kwargs)


def tiny_trainer(root: Path, max_steps: int, accumulate: int = 1, callbacks: list[Callback] | None = None) -> Trainer:
    callbacks = callbacks or []
    return Trainer(
        accelerator="cpu",
        devices=1,
        deterministic=True,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=root,
        callbacks=callbacks,
    )
