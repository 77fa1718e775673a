"""Optimizer recipes: LARS (You et al. 2017), SGD, AdamW; linear warm-up then cosine decay;
learning rate scaled by batch size / 256 (Goyal et al. 2017); no weight decay on biases and norms;
optional layer-wise learning-rate decay of a ViT (Clark et al. 2020; Bao et al. 2022; DINOv2 pretraining)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    import lightning.pytorch as pl


@dataclass
class OptimConfig:
    """How a method is optimized. ``lr`` is the base rate for a batch of 256 when ``scale_lr``.

    ``layer_decay`` (ViT backbones only; ``None``: off) trains ViT layer ``i`` of ``L + 1`` at
    ``lr * layer_decay ** (L + 1 - i)`` (``layer_decay_groups``), e.g. 0.9 in DINOv2's default recipe."""

    name: Literal["lars", "sgd", "adamw"] = "lars"
    lr: float = 0.3
    scale_lr: Literal["linear", "sqrt", "none"] = "linear"
    weight_decay: float = 1e-6
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    lars_eta: float = 0.001
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.0
    layer_decay: Optional[float] = None

    def __post_init__(self) -> None:
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must lie in (0, 1] (or be null), got {self.layer_decay}")


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
    cfg: OptimConfig, modules: Iterable[nn.Module], batch_size: int, fixed_lr_modules: Iterable[nn.Module] = (),
    fused: bool = True,
) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over ``modules`` and ``fixed_lr_modules`` (groups marked ``fixed_lr``),
    at the learning rate scaled for ``batch_size``; ``fused``: torch's fused kernels where ``fusable`` (pass
    ``fused_allowed(trainer)``)."""
    lr = scaled_lr(cfg.lr, batch_size, cfg.scale_lr)
    if cfg.layer_decay is None:
        groups = param_groups(modules, cfg.weight_decay)
    else:
        groups = layer_decay_groups(modules, cfg.weight_decay, cfg.layer_decay, lr)
    groups += param_groups(fixed_lr_modules, cfg.weight_decay, fixed_lr=True)
    return optimizer_for_groups(cfg, [group for group in groups if group["params"]], lr, fused)


_VIT_STEM = re.compile(r"^(cls_token|reg_token|register_tokens|dist_token|mask_token|pos_embed|patch_embed|norm_pre)\b")
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def find_vit(modules: Iterable[nn.Module]) -> nn.Module:
    """The one trained ViT trunk inside ``modules``: a module with a ``patch_embed``, a ``blocks`` list and
    parameters that take a gradient (timm's ``VisionTransformer`` inside ``TimmViT``, MAE's encoder; a frozen EMA
    teacher is not one); one line when there is none or more than one."""
    found: list[nn.Module] = []
    for module in modules:
        for sub in module.modules():
            vit = hasattr(sub, "patch_embed") and isinstance(getattr(sub, "blocks", None), (nn.ModuleList, nn.Sequential))
            if vit and any(p.requires_grad for p in sub.parameters()) and not any(sub is f for f in found):
                found.append(sub)
    if len(found) != 1:
        raise ValueError(
            f"optim.layer_decay needs exactly one trained ViT backbone (patch_embed and blocks), "
            f"found {len(found)}; leave optim.layer_decay null for other backbones"
        )
    return found[0]


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer of a ViT parameter named ``name`` (relative to the ViT) for lr decay: 0 for the patch embedding,
    positions and input tokens ([CLS], registers, mask token), ``i + 1`` for block ``i``, ``num_layers + 1`` for
    the rest (final norm); DINOv2's ``get_vit_lr_decay_rate`` and MAE's ``get_layer_id_for_vit``."""
    if _VIT_STEM.match(name):
        return 0
    block = _VIT_BLOCK.match(name)
    return int(block.group(1)) + 1 if block else num_layers + 1


def layer_decay_groups(modules: Iterable[nn.Module], weight_decay: float, layer_decay: float, lr: float,
                       no_weight_decay: frozenset[str] = frozenset()) -> list[dict]:
    """``param_groups`` split further by ViT layer, each group at its own ``lr * layer_decay ** (L + 1 - layer)``
    (its ``lr`` key; ``LambdaLR`` then scales each group's own rate). ``L`` is the number of blocks of the one ViT
    in ``modules`` (``find_vit``); its parameters get ``vit_layer_id``; a parameter outside it (the heads) is in
    the top layer ``L + 1`` (scale 1), except a ``mask_token`` of the method, an input token like [CLS] (layer 0).
    Biases and norm weights (1-D), and the ViT's parameters named in ``no_weight_decay`` (e.g. ``pos_embed``, as
    MAE's fine-tuning), keep no weight decay and no LARS adaptation."""
    modules = list(modules)
    vit = find_vit(modules)
    num_layers = len(vit.blocks)
    layer_of = {id(p): vit_layer_id(name, num_layers) for name, p in vit.named_parameters()}
    undecayed = {id(p) for name, p in vit.named_parameters() if name in no_weight_decay}
    groups: dict[tuple[int, bool], dict] = {}
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            default = 0 if name.rsplit(".", 1)[-1] == "mask_token" else num_layers + 1
            layer, no_decay = layer_of.get(id(param), default), param.ndim <= 1 or id(param) in undecayed
            scale = layer_decay ** (num_layers + 1 - layer)
            group = groups.setdefault((layer, no_decay), {
                "params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lars_exclude": no_decay,
                "fixed_lr": False, "lr": lr * scale, "lr_scale": scale, "layer": layer,
            })
            group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def optimizer_for_groups(cfg: OptimConfig, groups: list[dict], lr: float, fused: bool = True) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over parameter ``groups`` at learning rate ``lr`` (a group's own
    ``lr`` key, e.g. from layer-wise decay, takes precedence); AdamW fused when ``fused`` and ``fusable``."""
    fused = fused and fusable(groups)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)  # not fused: see ``fusable``
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.name!r}; use 'lars', 'sgd' or 'adamw'")


def fusable(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW kernel (one kernel over all parameters) takes these parameters: floating point,
    on the CPU or a CUDA device, not sharded (FSDP2's DTensors keep torch's default). It updates the same values as
    the per-tensor loop, 4-5x faster on this project's CPU (ResNet-18) and without a launch per tensor on a GPU.
    SGD stays unfused: torch's fused SGD fails on a parameter whose first gradient comes after the others' (SwAV's
    prototypes, frozen for the first steps)."""
    params = [p for group in groups for p in group["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor)
               for p in params)


def fused_allowed(trainer: pl.Trainer) -> bool:
    """False when the trainer clips gradients under mixed precision: Lightning's plugin then refuses optimizers
    that unscale gradients inside their step, which fused ones do (bf16 included, where nothing is scaled)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    clips = getattr(trainer, "gradient_clip_val", None)
    return not (clips and isinstance(getattr(trainer, "precision_plugin", None), MixedPrecision))


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
