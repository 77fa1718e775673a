"""MoCo v2, MoCo v3, BYOL, SimSiam: targets start as copies, no gradient through the target branch,
SimSiam's fixed predictor lr, MoCo v3 on a ViT, and SimSiam's collapse without stop-gradient."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn

from ssl_lightning.callbacks.collapse import CollapseMonitor, effective_rank, embedding_std
from ssl_lightning.callbacks.momentum import MomentumUpdate
from ssl_lightning.callbacks.queue import QueueUpdate
from ssl_lightning.losses import negative_cosine_similarity, normalized_mse
from ssl_lightning.methods import BYOL, MoCoV2, MoCoV3, SimSiam
from ssl_lightning.optim import OptimConfig, scaled_lr
from tests.tiny_methods import one_thread, tiny_data, tiny_method, tiny_trainer  # noqa: F401 (autouse fixture)


def _batch(n: int = 8, size: int = 16) -> dict[str, Any]:
    return {"views": [torch.randn(n, 3, size, size), torch.randn(n, 3, size, size)], "label": torch.zeros(n).long()}


def _step(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        return model.training_step(batch, 0)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("cls", "pairs"),
    [
        (BYOL, [("backbone", "target_backbone"), ("projector", "target_projector")]),
        (MoCoV2, [("backbone", "key_backbone"), ("projector", "key_projector")]),
        (MoCoV3, [("backbone", "momentum_backbone"), ("projector", "momentum_projector")]),
    ],
)
def test_targets_start_as_frozen_copies_and_come_with_their_callbacks(cls: type, pairs: list[tuple[str, str]]) -> None:
    model = tiny_method(cls)
    for online, target in pairs:
        online, target = model.get_submodule(online), model.get_submodule(target)
        assert target is not online and _same(online, target)
        assert not any(p.requires_grad for p in target.parameters())
        assert all(p.requires_grad for p in online.parameters())
    optimized = {id(p) for m in model.optimized_modules() for p in m.parameters()}
    assert not any(id(p) in optimized for _, target in pairs for p in model.get_submodule(target).parameters())
    callbacks = {type(c): c for c in model.configure_callbacks()}
    assert callbacks[MomentumUpdate].pairs == pairs
    assert (QueueUpdate in callbacks) == (cls is MoCoV2)
    assert not hasattr(model, "target_predictor") and not hasattr(model, "momentum_predictor")  # online side only


def test_byol_passes_no_gradient_to_the_target() -> None:
    model = tiny_method(BYOL)
    batch = _batch()
    out = _step(model, batch)
    out["loss"].backward()
    assert all(p.grad is None for p in [*model.target_backbone.parameters(), *model.target_projector.parameters()])
    assert all(p.grad is not None for p in model.predictor.parameters())
    # the loss is the symmetric normalized MSE between online predictions and the target projections
    v1, v2 = batch["views"]
    with torch.no_grad():
        p1, p2 = (model.predictor(model.projector(model(v))) for v in (v1, v2))
        z1, z2 = (model.target_projector(model.target_backbone(v)) for v in (v1, v2))
        torch.testing.assert_close(out["loss"], normalized_mse(p1, z2) + normalized_mse(p2, z1))


def _simsiam_grads(model: SimSiam, batch: dict[str, Any]) -> list[torch.Tensor]:
    model.zero_grad()
    _step(model, batch)["loss"].backward()
    return [p.grad.clone() for p in model.parameters()]


def test_simsiam_passes_no_gradient_through_the_target_branch() -> None:
    """With stop-gradient the gradient is that of D(p1, z2) / 2 + D(p2, z1) / 2 with z held constant."""
    model = tiny_method(SimSiam)
    batch = _batch()
    grads = _simsiam_grads(model, batch)

    model.zero_grad()
    v1, v2 = batch["views"]
    with torch.no_grad():
        z1_const, z2_const = model.projector(model(v1)), model.projector(model(v2))
    p1, p2 = model.predictor(model.projector(model(v1))), model.predictor(model.projector(model(v2)))
    (negative_cosine_similarity(p1, z2_const) / 2 + negative_cosine_similarity(p2, z1_const) / 2).backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)

    model.stop_gradient = False  # the ablation: the target branch now carries gradient
    without = _simsiam_grads(model, batch)
    assert any(not torch.allclose(g, w) for g, w in zip(grads, without))


def test_moco_v2_keys_come_from_the_key_encoder_without_gradient() -> None:
    model = tiny_method(MoCoV2)
    batch = _batch()
    out = _step(model, batch)
    out["loss"].backward()
    assert not out["keys"].requires_grad
    assert all(p.grad is None for p in [*model.key_backbone.parameters(), *model.key_projector.parameters()])
    with torch.no_grad():
        expected = F.normalize(model.key_projector(model.key_backbone(batch["views"][1])), dim=1)
    torch.testing.assert_close(out["keys"], expected)
    assert model.queue.shape == (24, 16) and model.queue_ptr.item() == 0


def test_simsiam_predictor_keeps_the_base_learning_rate(tmp_path: Path) -> None:
    model = tiny_method(SimSiam, optim=OptimConfig(name="sgd", lr=0.05, warmup_epochs=0, weight_decay=1e-4))
    trainer = tiny_trainer(tmp_path, max_steps=3)
    trainer.fit(model, tiny_data())
    base = scaled_lr(0.05, 8, "linear")
    predictor = {id(p) for p in model.predictor.parameters()}
    groups = trainer.optimizers[0].param_groups
    fixed = [g for g in groups if g["fixed_lr"]]
    assert {id(p) for g in fixed for p in g["params"]} == predictor
    assert all(g["lr"] == pytest.approx(base) for g in fixed)
    assert all(g["lr"] < base for g in groups if not g["fixed_lr"])  # cosine-decayed after 3 of 3 steps


def test_moco_v3_on_a_vit_with_a_frozen_patch_projection(tmp_path: Path) -> None:
    backbone = {"backbone": "vit_tiny", "backbone_kwargs": {"image_size": 16, "patch_size": 8, "depth": 1}}
    model = tiny_method(MoCoV3, freeze_patch_embed=True, projection_layers=3, **backbone)
    patch = model.backbone.model.patch_embed
    frozen = [p.clone() for p in patch.parameters()]
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, tiny_data())
    assert all(torch.equal(p, f) for p, f in zip(patch.parameters(), frozen))
    assert trainer.logged_metrics["train/loss"].isfinite()
    with pytest.raises(ValueError, match="patch_embed"):
        tiny_method(MoCoV3, freeze_patch_embed=True)  # a ResNet has no patch projection


def test_collapse_statistics() -> None:
    spread = torch.randn(256, 32)
    assert embedding_std(spread).item() == pytest.approx(32**-0.5, rel=0.1)
    assert effective_rank(spread).item() > 25
    collapsed = torch.randn(1, 32) + 1e-4 * torch.randn(256, 32)
    assert embedding_std(collapsed).item() < 1e-3 and effective_rank(collapsed).item() < 1.1


def _simsiam_run(tmp_path: Path, stop_gradient: bool) -> tuple[CollapseMonitor, dict[str, float]]:
    monitor = CollapseMonitor(every_n_batches=1)
    model = tiny_method(SimSiam, stop_gradient=stop_gradient, optim=OptimConfig(name="sgd", lr=0.5, warmup_epochs=0))
    trainer = tiny_trainer(tmp_path, max_steps=60, callbacks=[monitor])
    trainer.fit(model, tiny_data(num_samples=64, batch_size=32))
    return monitor, {name: float(value) for name, value in trainer.logged_metrics.items()}


def test_simsiam_collapses_without_stop_gradient_and_the_monitor_reports_it(tmp_path: Path) -> None:
    """Chen and He 2021, fig. 2. With a BatchNorm at the projector's output the collapse is onto a few
    directions: the effective rank of 32-d embeddings of 32 images falls from ~20 to 2-4 (the monitor warns
    below 3.2; where it ends after 60 steps depends on the CPU's rounding: below 3.2 on an AVX2 EPYC, 4.3 on an
    AVX-512 Xeon)."""
    with pytest.warns(UserWarning, match="collapsing"):
        monitor, metrics = _simsiam_run(tmp_path / "without", stop_gradient=False)
    assert monitor.collapsed and metrics["collapse/effective_rank"] < 5 and metrics["train/loss"] < -0.7

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CollapseMonitor")
        monitor, metrics = _simsiam_run(tmp_path / "with", stop_gradient=True)
    assert not monitor.collapsed and metrics["collapse/effective_rank"] > 10


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
@pytest.mark.parametrize("cls", [BYOL, SimSiam])
def test_half_precision_weights_are_refused_in_one_line(tmp_path: Path, precision: str, cls: type) -> None:
    """An EMA step moves a bfloat16 target by less than its resolution: most weights would never move (and
    without a target, the float32 views met bfloat16 weights in a dtype error)."""
    target = torch.randn(10_000).bfloat16()
    online = target + 0.1 * torch.randn(10_000).bfloat16()
    averaged = target.clone()
    for _ in range(100):
        averaged.lerp_(online, 1 - 0.996)
    assert (averaged == target).float().mean() > 0.5  # why: more than half never moved in 100 steps
    trainer = Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)
    dtype = "torch.bfloat16" if precision == "bf16-true" else "torch.float16"
    with pytest.raises(ValueError, match=f"^{cls.__name__}: weights stored in {dtype} .* use precision bf16-mixed or 16-mixed$"):
        trainer.fit(tiny_method(cls), tiny_data())
