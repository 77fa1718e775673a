"""LARS against a per-parameter loop of its formula; parameter groups; schedule; lr scaling."""

import math

import pytest
import torch
from torch import nn

from ssl_lightning.optim import LARS, OptimConfig, build_optimizer, param_groups, scaled_lr, warmup_cosine


def reference_lars_step(params, grads, bufs, lr, momentum, weight_decay, eta, exclude):
    """You et al. 2017, as in SimCLR: d = g + wd*w; d *= eta*||w||/||d||; v = m*v + d; w -= lr*v."""
    for p, g, v in zip(params, grads, bufs):
        d = g + weight_decay * p
        if not exclude and p.norm() > 0 and d.norm() > 0:
            d = d * (eta * p.norm() / d.norm())
        v.mul_(momentum).add_(d)
        p.sub_(lr * v)


def test_lars_matches_reference_over_steps() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    groups = param_groups([model], weight_decay=0.01)
    optimizer = LARS(groups, lr=0.5, momentum=0.9, eta=0.02)
    ref = {id(p): (p.detach().clone(), torch.zeros_like(p)) for p in model.parameters()}
    excluded = {id(p) for p in groups[1]["params"]}
    for step in range(3):
        model.zero_grad()
        model(torch.randn(8, 5)).pow(2).mean().backward()
        for p in model.parameters():
            w, v = ref[id(p)]
            wd = 0.0 if id(p) in excluded else 0.01
            reference_lars_step([w], [p.grad], [v], 0.5, 0.9, wd, 0.02, id(p) in excluded)
        optimizer.step()
        for p in model.parameters():
            torch.testing.assert_close(p.detach(), ref[id(p)][0])


def test_param_groups_exclude_biases_and_norm_weights() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = param_groups([model], weight_decay=0.1)
    assert {p.shape for p in decay["params"]} == {torch.Size([4, 3, 3, 3]), torch.Size([2, 4])}
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0 and no_decay["lars_exclude"]


def test_warmup_then_cosine() -> None:
    factor = warmup_cosine(warmup_steps=10, total_steps=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0, abs=1e-12)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 110))


def test_lr_scaling_and_optimizer_choice() -> None:
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(0.075 * math.sqrt(16))
    model = nn.Linear(2, 2)
    assert isinstance(build_optimizer(OptimConfig(name="adamw", lr=1e-3), [model], 512), torch.optim.AdamW)
    sgd = build_optimizer(OptimConfig(name="sgd", lr=0.1), [model], 512)
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="'adam'"):
        build_optimizer(OptimConfig(name="adam"), [model], 256)  # type: ignore[arg-type]


def test_fused_adamw_updates_as_the_per_tensor_loop() -> None:
    """``build_optimizer`` picks torch's fused AdamW on the CPU; over steps it gives the weights of torch's
    per-tensor loop (``foreach=False``) with the same groups (weight decay off on biases and norms)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.BatchNorm1d(4), nn.Linear(4, 3))  # every gradient non-zero
    reference = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.BatchNorm1d(4), nn.Linear(4, 3))
    reference.load_state_dict(model.state_dict())
    config = OptimConfig(name="adamw", lr=0.1, weight_decay=0.05)
    fused = build_optimizer(config, [model], 256)
    assert fused.defaults["fused"] and len(fused.param_groups) == 2
    loop = torch.optim.AdamW(param_groups([reference], config.weight_decay), lr=0.1, foreach=False, betas=config.betas)
    for _ in range(4):
        inputs = torch.randn(8, 5)
        for network, optimizer in ((model, fused), (reference, loop)):
            optimizer.zero_grad()
            network(inputs).pow(2).mean().backward()
            optimizer.step()
    for (name_, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name_} differs from the per-tensor loop")


def test_no_fused_optimizer_where_lightning_clips_gradients_under_mixed_precision() -> None:
    """Lightning's mixed-precision plugin refuses to clip the gradients of an optimizer that unscales them in its
    step (fused ones), bf16 included: the method then builds the unfused one."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from ssl_lightning.optim import fused_allowed

    mixed = MixedPrecision("bf16-mixed", "cpu")
    assert not fused_allowed(SimpleNamespace(gradient_clip_val=3.0, precision_plugin=mixed))
    assert fused_allowed(SimpleNamespace(gradient_clip_val=None, precision_plugin=mixed))
    assert fused_allowed(SimpleNamespace(gradient_clip_val=3.0, precision_plugin=Precision()))
    model = nn.Linear(2, 2)
    assert not build_optimizer(OptimConfig(name="adamw"), [model], 256, fused=False).defaults["fused"]
    assert not build_optimizer(OptimConfig(name="sgd"), [model], 256).defaults["fused"]  # see optim.fusable
