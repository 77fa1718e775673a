"""Layer-wise learning-rate decay during pretraining (``OptimConfig.layer_decay``; DINOv2, Oquab et al. 2023, and
its reference code's ``get_vit_lr_decay_rate``): every parameter's learning rate against a loop over the named
parameters, the warm-up cosine schedule on top, the no-weight-decay groups kept, the default path unchanged."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.methods import DINO
from ssl_lightning.optim import (
    OptimConfig,
    build_optimizer,
    layer_decay_groups,
    optimizer_for_groups,
    param_groups,
    scaled_lr,
    warmup_cosine,
)

DEPTH = 3
VIT = {"backbone": "vit_tiny", "backbone_kwargs": {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": DEPTH,
                                                   "num_heads": 2, "reg_tokens": 2, "init_values": 1e-5}}
HEAD = {"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8}


def stub_trainer(batch: int = 64) -> SimpleNamespace:
    return SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch), world_size=1, accumulate_grad_batches=1,
                           estimated_stepping_batches=10)


def built(layer_decay: float | None, name: str = "adamw", min_lr_ratio: float = 0.1) -> tuple[DINO, Any, Any]:
    torch.manual_seed(0)
    optim = OptimConfig(name=name, lr=0.4, weight_decay=0.05, warmup_epochs=0, min_lr_ratio=min_lr_ratio,  # type: ignore[arg-type]
                        layer_decay=layer_decay)
    model = DINO(**VIT, **HEAD, optim=optim)
    model.trainer = stub_trainer()  # type: ignore[assignment]
    config = model.configure_optimizers()
    return model, config["optimizer"], config["lr_scheduler"]["scheduler"]


def expected_layer(name: str) -> int:
    """The layer of a parameter of DINO's trained modules, written out by hand: the patch embedding, positions,
    [CLS] and register tokens 0, block i i + 1, the rest of the ViT (final norm) and the head DEPTH + 1."""
    if name.startswith("backbone.model."):
        inner = name[len("backbone.model."):]
        for stem in ("patch_embed.", "pos_embed", "cls_token", "reg_token"):
            if inner.startswith(stem):
                return 0
        block = re.match(r"blocks\.(\d+)\.", inner)
        if block:
            return int(block.group(1)) + 1
        return DEPTH + 1
    assert name.startswith("head."), name
    return DEPTH + 1


def test_each_parameter_trains_at_decay_to_the_power_of_its_depth_from_the_top() -> None:
    decay = 0.5
    model, optimizer, _ = built(decay)
    base = scaled_lr(0.4, 64, "linear")
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    trained = [(f"{prefix}.{n}", p) for prefix in ("backbone", "head")
               for n, p in model.get_submodule(prefix).named_parameters() if p.requires_grad]
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(trained)  # each once
    assert not any(id(p) in group_of for p in model.teacher_backbone.parameters())
    layers_seen = set()
    for name, param in trained:
        layer = expected_layer(name)
        layers_seen.add(layer)
        group = group_of[id(param)]
        assert group["lr"] == pytest.approx(base * decay ** (DEPTH + 1 - layer), rel=1e-12), name
        assert group["weight_decay"] == (0.0 if param.ndim <= 1 else 0.05), name  # biases, norms, LayerScale: none
        assert group["lars_exclude"] == (param.ndim <= 1)
    assert layers_seen == set(range(DEPTH + 2))
    assert any(n.endswith("reg_token") for n, _ in trained) and any(".ls1." in n for n, _ in trained)


def test_the_warmup_cosine_schedule_multiplies_each_groups_own_rate() -> None:
    _, optimizer, scheduler = built(0.7)
    initial = [group["lr"] for group in optimizer.param_groups]
    assert len(set(initial)) == DEPTH + 2
    factor = warmup_cosine(0, 10, 0.1)
    for step in range(1, 6):
        optimizer.step()
        scheduler.step()
        for group, lr in zip(optimizer.param_groups, initial):
            assert group["lr"] == pytest.approx(lr * factor(step), rel=1e-12)


def test_decay_one_keeps_every_rate_and_lars_takes_the_groups() -> None:
    _, optimizer, _ = built(1.0, name="lars")
    assert {group["lr"] for group in optimizer.param_groups} == {scaled_lr(0.4, 64, "linear")}
    assert type(optimizer).__name__ == "LARS"


def test_without_layer_decay_the_optimizer_is_the_one_built_before() -> None:
    """The default path: two groups (decayed, biases and norms) at the scaled rate, as ``param_groups`` makes them."""
    model, optimizer, _ = built(None)
    cfg = OptimConfig(name="adamw", lr=0.4, weight_decay=0.05, warmup_epochs=0, min_lr_ratio=0.1)
    groups = [g for g in param_groups(model.optimized_modules(), 0.05) if g["params"]]
    reference = optimizer_for_groups(cfg, groups, scaled_lr(0.4, 64, "linear"))
    assert len(optimizer.param_groups) == 2
    for group, ref in zip(optimizer.param_groups, reference.param_groups):
        assert [id(p) for p in group["params"]] == [id(p) for p in ref["params"]]
        assert {k: v for k, v in group.items() if k not in ("params", "initial_lr", "scheduled_weight_decay")} == \
            {k: v for k, v in ref.items() if k != "params"}


def test_a_mask_token_of_the_method_is_an_input_token_and_other_modules_are_the_top() -> None:
    vit = build_backbone("vit_tiny", image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    holder = nn.Module()
    holder.backbone, holder.mask_token, holder.head = vit, nn.Parameter(torch.zeros(32)), nn.Linear(32, 4)
    holder.teacher = copy.deepcopy(vit).requires_grad_(False)  # a frozen EMA copy is not a second ViT to decay
    groups = layer_decay_groups([holder], weight_decay=0.1, layer_decay=0.5, lr=1.0)
    scale = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert len(scale) == sum(p.requires_grad for p in holder.parameters())
    assert scale[id(holder.mask_token)] == 0.5 ** 3
    assert scale[id(holder.head.weight)] == 1.0 and scale[id(vit.model.blocks[0].attn.qkv.weight)] == 0.5 ** 2


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_layer_decay_outside_zero_one_is_one_line(value: float) -> None:
    with pytest.raises(ValueError, match=r"optim\.layer_decay must lie in \(0, 1\]") as err:
        OptimConfig(layer_decay=value)
    assert "\n" not in str(err.value)


def test_layer_decay_needs_a_vit() -> None:
    resnet = build_backbone("cifar_resnet18", base_width=4)
    with pytest.raises(ValueError, match="layer_decay needs exactly one trained ViT") as err:
        build_optimizer(OptimConfig(layer_decay=0.9), [resnet], 64)
    assert "\n" not in str(err.value)
