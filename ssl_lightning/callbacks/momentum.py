"""Momentum (EMA) update of target networks after each real optimizer step: MoCo's key encoder
(He et al. 2020, eq. 2), BYOL's target (Grill et al. 2020, sec. 3.1), MoCo v3's momentum encoder."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Optional, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.hooks import RemovableHandle

from ssl_lightning.optim import total_optimizer_steps
from ssl_lightning.sharding import local_shards, reshard, sharding_of


@torch.no_grad()
def ema_update_(targets: list[torch.Tensor], onlines: list[torch.Tensor], momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for every pair, in one fused call.

    Sharded parameters (FSDP2 ``DTensor``s, ``ssl_lightning.sharding``) are averaged shard by shard: a target and
    its online copy are split alike, so each rank lerps its local shards and nothing is gathered."""
    torch._foreach_lerp_(local_shards(targets), local_shards(onlines), 1.0 - momentum)


MomentumSchedule = Literal["cosine", "linear", "constant"]


def unknown_schedule(schedule: str) -> ValueError:
    """The error for a schedule that is not one of ``MomentumSchedule``'s, naming them."""
    *names, last = (repr(name) for name in get_args(MomentumSchedule))
    return ValueError(f"unknown momentum schedule {schedule!r}; use {', '.join(names)} or {last}")


def scheduled_momentum(
    step: int, total_steps: int, base: float, final: float = 1.0, schedule: MomentumSchedule = "cosine"
) -> float:
    """The momentum after optimizer step ``step`` (0-based) of ``total_steps``.

    ``cosine`` is BYOL's ``tau = final - (final - base) * (cos(pi * k / K) + 1) / 2``: ``base`` at the first
    step, rising to ``final`` at the last; ``linear`` is ``base + (final - base) * k / K``, the schedule of I-JEPA's
    and MSN's reference code; ``constant`` is MoCo's fixed ``base``.
    """
    if schedule == "constant":
        return base
    progress = min(1.0, step / max(1, total_steps))
    if schedule == "cosine":
        return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
    if schedule == "linear":
        return base + (final - base) * progress
    raise unknown_schedule(schedule)


class MomentumUpdate(Callback):
    """EMA of online modules into their frozen target copies, once per real optimizer step.

    Args:
        pairs: ``(online, target)`` submodule names of the method, e.g. ``("backbone", "target_backbone")``.
            Parameters are averaged; buffers (BatchNorm statistics) are left to the target's own forward.
        base_momentum: the momentum of the first step (MoCo 0.999, BYOL 0.996, MoCo v3 0.99).
        final_momentum: the momentum reached at the last step by the cosine or linear schedule.
        schedule: ``"cosine"`` (BYOL, MoCo v3), ``"linear"`` (I-JEPA's and MSN's code) or ``"constant"``
            (MoCo v1/v2), over the optimizer steps
            of the run (``optim.total_optimizer_steps``: ``max_epochs`` or ``max_steps``), not over batches.

    An optimizer step happened during a batch when ``trainer.global_step`` moved past the step of the last
    update (Lightning counts steps, not batches, under gradient accumulation). The step of the last update
    is read from the trainer when training starts, so a resumed run neither repeats nor skips an update.
    A step that the optimizer did not take (a mixed-precision ``GradScaler`` skips steps with inf/NaN
    gradients) counts for the schedule but gets no update: an optimizer step hook tells which steps ran.
    Logs ``train/momentum``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        base_momentum: float,
        final_momentum: float = 1.0,
        schedule: MomentumSchedule = "cosine",
    ) -> None:
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(f"need 0 <= base_momentum <= final_momentum <= 1, got {base_momentum} and {final_momentum}")
        if schedule not in get_args(MomentumSchedule):
            raise unknown_schedule(schedule)
        self.pairs = [tuple(pair) for pair in pairs]
        self.base_momentum, self.final_momentum, self.schedule = base_momentum, final_momentum, schedule
        self._targets: list[torch.Tensor] = []
        self._onlines: list[torch.Tensor] = []
        self._last_step: Optional[int] = None
        self._optimizer_stepped = False
        self._hooks: list[RemovableHandle] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._targets, self._onlines = [], []
        reshard(pl_module)  # sharded: the persistent shards, not parameters a validation forward left gathered
        for online_name, target_name in self.pairs:
            online, target = pl_module.get_submodule(online_name), pl_module.get_submodule(target_name)
            online_params, target_params = list(online.parameters()), list(target.parameters())
            if [p.shape for p in online_params] != [p.shape for p in target_params]:
                raise ValueError(f"MomentumUpdate: {target_name!r} is not a copy of {online_name!r} (parameters differ)")
            if [sharding_of(p) for p in online_params] != [sharding_of(p) for p in target_params]:
                raise ValueError(f"MomentumUpdate: {target_name!r} is not sharded like {online_name!r}")
            if any(p.requires_grad for p in target_params):
                raise ValueError(f"MomentumUpdate: the target {target_name!r} must be frozen (requires_grad=False)")
            self._onlines += online_params
            self._targets += target_params
        self._last_step = trainer.global_step  # restored from the checkpoint on resume
        self._optimizer_stepped = False
        self._hooks = [opt.register_step_post_hook(self._mark_step) for opt in trainer.optimizers]

    def _mark_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._optimizer_stepped = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # accumulating gradients: no optimizer step in this batch
        self._last_step = trainer.global_step
        step, total = trainer.global_step - 1, total_optimizer_steps(trainer)
        momentum = scheduled_momentum(step, total, self.base_momentum, self.final_momentum, self.schedule)
        if self._optimizer_stepped:
            ema_update_(self._targets, self._onlines, momentum)
        self._optimizer_stepped = False
        pl_module.log("train/momentum", momentum, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
