"""Optimizer recipes: LARS (You et al. 2017), SGD, AdamW; linear warm-up then cosine decay;
learning rate scaled by batch size / 256 (Goyal et al. 2017); no weight decay on biases and norms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    import lightning.pytorch as pl


@dataclass
class OptimConfig:
    """How a method is optimized. ``lr`` is the base rate for a batch of 256 when ``scale_lr``."""

    name: Literal["lars", "sgd", "adamw"] = "lars"
    lr: float = 0.3
    scale_lr: Literal["linear", "sqrt", "none"] = "linear"
    weight_decay: float = 1e-6
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    lars_eta: float = 0.001
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.0


# saved in checkpoints' hyper-parameters; a plain data container, safe for ``torch.load(weights_only=True)``
torch.serialization.add_safe_globals([OptimConfig])


def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """The learning rate for a global ``batch_size`` under the scaling ``rule``."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size / 256)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown scale_lr rule {rule!r}; use 'linear', 'sqrt' or 'none'")


def param_groups(modules: Iterable[nn.Module], weight_decay: float, fixed_lr: bool = False) -> list[dict]:
    """Split parameters into a decayed group and a group of biases and norm weights (1-D tensors),
    which get neither weight decay nor LARS adaptation. ``fixed_lr`` marks groups that the schedule
    leaves at the base learning rate."""
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False, "fixed_lr": fixed_lr},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, "fixed_lr": fixed_lr},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio ``eta * ||w|| / ||g + wd * w||``.

    Groups with ``lars_exclude=True`` skip the trust ratio. All updates use ``torch._foreach_*``.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if not group["lars_exclude"]:
                param_norms = torch.stack(torch._foreach_norm(params))
                grad_norms = torch.stack(torch._foreach_norm(grads))
                trust = torch.where(
                    (param_norms > 0) & (grad_norms > 0), group["eta"] * param_norms / grad_norms, torch.ones_like(param_norms)
                )
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def build_optimizer(
    cfg: OptimConfig, modules: Iterable[nn.Module], batch_size: int, fixed_lr_modules: Iterable[nn.Module] = ()
) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over ``modules`` and ``fixed_lr_modules`` (groups marked ``fixed_lr``),
    at the learning rate scaled for ``batch_size``."""
    lr = scaled_lr(cfg.lr, batch_size, cfg.scale_lr)
    groups = param_groups(modules, cfg.weight_decay) + param_groups(fixed_lr_modules, cfg.weight_decay, fixed_lr=True)
    return optimizer_for_groups(cfg, [group for group in groups if group["params"]], lr)


def optimizer_for_groups(cfg: OptimConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over parameter ``groups`` at learning rate ``lr`` (a group's own
    ``lr`` key, e.g. from layer-wise decay, takes precedence)."""
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)
    raise ValueError(f"unknown optimizer {cfg.name!r}; use 'lars', 'sgd' or 'adamw'")


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """A multiplier for ``LambdaLR``: linear from ~0 to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in one training epoch: ``ceil(batches / accumulate_grad_batches)``, where ``batches`` is
    this rank's number of training batches after ``limit_train_batches`` (Lightning steps on an epoch's last
    batch even when the accumulation is incomplete). Sets up the training loader if it is not set up yet."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if batches == float("inf"):
        raise ValueError(
            "a schedule given in epochs needs a training loader with a length; this one has none "
            "(an iterable dataset): set the warm-up to 0 epochs"
        )
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def total_optimizer_steps(trainer: pl.Trainer) -> int:
    """Optimizer steps of the whole run, whether ``trainer.max_epochs`` or ``trainer.max_steps`` (the smaller when
    both) sets its length: the horizon of every schedule (learning rate, weight decay, EMA momentum)."""
    total = trainer.estimated_stepping_batches
    if total == float("inf"):
        raise ValueError(
            "the schedules need a finite run: set trainer.max_epochs or trainer.max_steps "
            f"(got max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps})"
        )
    return max(1, int(total))


def warmup_cosine_steps(trainer: pl.Trainer, warmup_epochs: float) -> tuple[int, int]:
    """``(warmup_steps, total_steps)`` of a warm-up of ``warmup_epochs`` real epochs in the run ``trainer`` makes."""
    total = total_optimizer_steps(trainer)
    if warmup_epochs <= 0:
        return 0, total
    return min(total, round(warmup_epochs * steps_per_epoch(trainer))), total


def constant_lr(step: int) -> float:
    """A multiplier for ``LambdaLR`` that keeps the base learning rate (SimSiam's fixed predictor lr)."""
    return 1.0


def cosine_schedule(step: int, total_steps: int, base: float, final: float) -> float:
    """``final + (base - final) * (1 + cos(pi * step / total_steps)) / 2``: ``base`` at step 0 towards ``final``
    (DINO's weight-decay schedule, Caron et al. 2021, appendix: 0.04 -> 0.4 over the optimizer steps)."""
    progress = min(1.0, step / max(1, total_steps))
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def clip_grad_norm_per_parameter_(params: Iterable[torch.Tensor], max_norm: float) -> None:
    """Scale each parameter's gradient whose norm exceeds ``max_norm`` down to ``max_norm`` (each tensor on
    its own, not one global norm: DINO's ``clip_gradients``, Caron et al. 2021). Parameters without a
    gradient are skipped."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(factors.unbind()))
