"""The learning rate a method's ``configure_optimizers`` builds: base lr x global batch / 256 (Goyal et al.
2017), where the global batch counts every process and every accumulated micro-batch; ``sqrt`` and ``none``."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from ssl_lightning.methods import SimCLR
from ssl_lightning.optim import OptimConfig

BACKBONE = {"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}, "projection_hidden_dim": 8,
            "projection_dim": 4}


def stub_trainer(per_device_batch: int, world_size: int, accumulate: int) -> SimpleNamespace:
    """What ``configure_optimizers`` reads of a trainer (no warm-up: the schedule needs only the step count)."""
    return SimpleNamespace(datamodule=SimpleNamespace(batch_size=per_device_batch), world_size=world_size,
                           accumulate_grad_batches=accumulate, estimated_stepping_batches=100)


def built_lr(rule: str, per_device_batch: int, world_size: int, accumulate: int) -> float:
    model = SimCLR(**BACKBONE, optim=OptimConfig(name="sgd", lr=0.3, scale_lr=rule, warmup_epochs=0))  # type: ignore[arg-type]
    model.trainer = stub_trainer(per_device_batch, world_size, accumulate)  # type: ignore[assignment]
    optimizer = model.configure_optimizers()["optimizer"]
    lrs = {group["lr"] for group in optimizer.param_groups}
    assert len(lrs) == 1, lrs
    return lrs.pop()


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("linear", 0.3 * (16 * 2 * 2) / 256), ("sqrt", 0.3 * math.sqrt(16 * 2 * 2 / 256)), ("none", 0.3)],
)
def test_lr_is_scaled_by_world_size_times_accumulation(rule: str, expected: float) -> None:
    """16 images per device, 2 processes, 2 micro-batches per step: an optimizer step sees 64 images."""
    assert built_lr(rule, 16, world_size=2, accumulate=2) == pytest.approx(expected, rel=1e-12)


def test_each_factor_of_the_global_batch_counts() -> None:
    one = built_lr("linear", 16, world_size=1, accumulate=1)
    assert one == pytest.approx(0.3 * 16 / 256, rel=1e-12)
    assert built_lr("linear", 16, world_size=2, accumulate=1) == pytest.approx(2 * one, rel=1e-12)
    assert built_lr("linear", 16, world_size=1, accumulate=4) == pytest.approx(4 * one, rel=1e-12)


def test_a_datamodule_without_batch_size_is_named() -> None:
    model = SimCLR(**BACKBONE)
    model.trainer = SimpleNamespace(datamodule=None, world_size=1, accumulate_grad_batches=1)  # type: ignore[assignment]
    with pytest.raises(ValueError, match="batch_size"):
        model.configure_optimizers()
