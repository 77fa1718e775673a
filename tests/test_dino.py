"""DINO the method: the weight-normalized head, the teacher (a frozen copy that sees only the global crops), the
loss and center wiring, the frozen last layer, the weight-decay schedule, per-parameter clipping, ViT crops.
The loss, the center under DDP and the teacher temperature are tested in test_dino_loss.py."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback

from ssl_lightning.backbones import build_backbone
from ssl_lightning.callbacks.momentum import MomentumUpdate
from ssl_lightning.losses import dino_loss
from ssl_lightning.methods import DINO
from ssl_lightning.nn import DINOHead
from ssl_lightning.optim import OptimConfig, clip_grad_norm_per_parameter_
from tests.tiny_methods import one_thread, tiny_data, tiny_trainer  # noqa: F401 (autouse fixture)

HEAD = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8}


def tiny_dino(**kwargs: Any) -> DINO:
    torch.manual_seed(0)
    args: dict[str, Any] = {"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}, **HEAD,
                            "optim": OptimConfig(name="adamw", lr=1e-2, weight_decay=0.04, warmup_epochs=0)}
    return DINO(**{**args, **kwargs})


def crops(batch: int = 4, num_local: int = 3, size: int = 16, local_size: int = 8) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, size, size) for _ in range(2)] + [
        torch.randn(batch, 3, local_size, local_size) for _ in range(num_local)
    ]


def step(model: DINO, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        return model.training_step({"views": views, "label": torch.zeros(views[0].shape[0]).long()}, 0)


def test_head_is_weight_normalized_with_a_fixed_norm() -> None:
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    scale = head.last_layer.parametrizations.weight.original0
    assert not scale.requires_grad and torch.equal(scale, torch.ones(20, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(20))
    assert head.last_layer.bias is None and head(torch.randn(3, 12)).shape == (3, 20)
    assert DINOHead(12, 20, 16, 8, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_head_with_batchnorm_after_each_hidden_layer() -> None:
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8, use_bn=True)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    model = tiny_dino(use_bn_in_head=True)
    assert [type(m) for m in model.teacher_head.mlp] == [type(m) for m in model.head.mlp]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.teacher_head.modules()) == 2
    assert step(model, crops(batch=4, num_local=2))["loss"].isfinite()


def test_teacher_starts_as_a_frozen_copy_and_sees_only_the_global_crops() -> None:
    model = tiny_dino()
    for online, target in [("backbone", "teacher_backbone"), ("head", "teacher_head")]:
        online_state, target_state = model.get_submodule(online).state_dict(), model.get_submodule(target).state_dict()
        assert online_state.keys() == target_state.keys()
        assert all(torch.equal(online_state[k], target_state[k]) for k in online_state)
        assert not any(p.requires_grad for p in model.get_submodule(target).parameters())
    (callback,) = model.configure_callbacks()
    assert isinstance(callback, MomentumUpdate)
    assert callback.pairs == [("backbone", "teacher_backbone"), ("head", "teacher_head")]

    shapes: dict[str, list[tuple[int, ...]]] = {"teacher": [], "student": []}
    model.teacher_backbone.register_forward_hook(lambda m, args, out: shapes["teacher"].append(tuple(args[0].shape)))
    model.backbone.register_forward_hook(lambda m, args, out: shapes["student"].append(tuple(args[0].shape)))
    views = crops(batch=4, num_local=3)
    out = step(model, views)
    assert shapes["teacher"] == [(8, 3, 16, 16)]  # the 2 global crops, one batch
    assert shapes["student"] == [(8, 3, 16, 16), (12, 3, 8, 8)]  # every crop, one call per size
    assert out["features"].shape == (4, model.backbone.feature_dim) and not out["features"].requires_grad

    # the loss uses the center before this step (zeros) and tau_t of epoch 0; the center then moves
    with torch.no_grad():
        teacher = model.teacher(torch.cat(views[:2]))
        features = torch.cat([model.backbone(torch.cat(views[:2])), model.backbone(torch.cat(views[2:]))])
        student = list(model.head(features).chunk(5))  # BatchNorm statistics per size, as in the step
    expected = dino_loss(student, list(teacher.chunk(2)), torch.zeros(1, 32), 0.1, 0.04)
    torch.testing.assert_close(out["loss"].detach(), expected)
    torch.testing.assert_close(model.center, 0.1 * teacher.mean(dim=0, keepdim=True))

    with pytest.raises(ValueError, match=r"batch\['views'\]"):
        step(model, [views[0], views[2]])
    with pytest.raises(ValueError, match="final_weight_decay"):
        tiny_dino(final_weight_decay=0.4, optim=OptimConfig(name="adamw", weight_decay=0.0))


def test_clip_grad_norm_per_parameter_matches_a_loop() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(5))]
    for param, scale in zip(params, [0.1, 10.0, 3.0]):
        param.grad = torch.randn_like(param) * scale
    expected = []
    for param in params:
        grad = param.grad.clone() if param.grad is not None else None
        if grad is not None and grad.norm() > 3.0:
            grad = grad * 3.0 / (grad.norm() + 1e-6)
        expected.append(grad)
    clip_grad_norm_per_parameter_(params, 3.0)
    for param, grad in zip(params, expected):
        assert (param.grad is None) == (grad is None)
        if grad is not None:
            torch.testing.assert_close(param.grad, grad)


class _Record(Callback):
    """Per optimizer step: the weight decay of each parameter group; after it: is the last layer unchanged?"""

    def __init__(self) -> None:
        self.weight_decays: list[list[float]] = []
        self.last_layer_unchanged: list[bool] = []
        self.mlp_unchanged: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.last_layer = copy.deepcopy(pl_module.head.last_layer.state_dict())
        self.mlp = copy.deepcopy(pl_module.head.mlp.state_dict())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.weight_decays.append([group["weight_decay"] for group in optimizer.param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        def unchanged(module: torch.nn.Module, before: dict) -> bool:
            return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())

        self.last_layer_unchanged.append(unchanged(pl_module.head.last_layer, self.last_layer))
        self.mlp_unchanged.append(unchanged(pl_module.head.mlp, self.mlp))


def test_weight_decay_schedule_and_last_layer_frozen_during_the_first_epoch(tmp_path: Path) -> None:
    model = tiny_dino(final_weight_decay=0.4, freeze_last_layer_epochs=1, norm_last_layer=False)
    record = _Record()
    tiny_trainer(tmp_path, max_steps=6, callbacks=[record]).fit(model, tiny_data(num_samples=32, batch_size=8))
    # 4 steps per epoch: the last layer (v and g) stays fixed in epoch 0 and moves in epoch 1, the rest moves
    assert record.last_layer_unchanged == [True] * 4 + [False] * 2
    assert record.mlp_unchanged == [False] * 6
    decayed = [i for i, group in enumerate(model.optimizers().optimizer.param_groups) if group["scheduled_weight_decay"]]
    assert len(decayed) == 1 and len(record.weight_decays[0]) == 2
    for step_index, decays in enumerate(record.weight_decays):  # DINO's cosine_scheduler(0.04, 0.4, ...)
        expected = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * step_index / 6))
        assert decays[decayed[0]] == pytest.approx(expected)
        assert decays[1 - decayed[0]] == 0.0  # biases and norms


def test_vit_backbone_takes_global_and_local_crops() -> None:
    vit = build_backbone("vit_tiny", image_size=32, patch_size=8, depth=1)
    assert vit(torch.randn(2, 3, 32, 32)).shape == vit(torch.randn(2, 3, 16, 16)).shape == (2, 192)
    model = tiny_dino(backbone="vit_tiny", backbone_kwargs={"image_size": 32, "patch_size": 8, "depth": 2,
                                                            "drop_path_rate": 0.1})
    student_drop = [m.drop_prob for m in model.backbone.modules() if hasattr(m, "drop_prob")]
    teacher_drop = [m.drop_prob for m in model.teacher_backbone.modules() if hasattr(m, "drop_prob")]
    assert student_drop and all(p > 0 for p in student_drop) and teacher_drop == [0.0] * len(student_drop)
    out = step(model, crops(batch=2, num_local=2, size=32, local_size=16))
    assert out["loss"].isfinite() and out["features"].shape == (2, 192)
    out["loss"].backward()
    assert model.backbone.model.pos_embed.grad is not None
