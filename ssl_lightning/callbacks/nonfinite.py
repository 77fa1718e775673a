"""``NonFiniteGuard``: a diverged run stops loudly before a non-finite update reaches the weights.

Without it a NaN loss trains on silently, the run exits 0 and ``last.ckpt`` is overwritten with NaN
weights. The check sits in ``on_before_optimizer_step``: after backward, before the optimizer moves
anything, so the weights (and every checkpoint written from them) stay those of the last good step.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from ssl_lightning.sharding import local_shards, sharding_of

_RECORD = "_nonfinite_guard_values"  # the module attribute holding this step's logged train/ tensors


def record_train_value(module: LightningModule, name: str, value: Any) -> None:
    """Keep a tensor a method logs under ``train/`` until the guard has checked this optimizer step (a method
    calls it from its ``log``; without a ``NonFiniteGuard`` attached, nothing is kept)."""
    values: Optional[dict[str, list[torch.Tensor]]] = module.__dict__.get(_RECORD)
    if values is not None and name.startswith("train/") and isinstance(value, torch.Tensor):
        values.setdefault(name, []).append(value.detach())


class NonFiniteError(RuntimeError):
    """The run diverged: a non-finite loss, loss term, gradient or weight (the message names which)."""


class NonFiniteGuard(Callback):
    """Stop (or skip the step) when an optimizer step's loss or gradients are not finite.

    Each optimizer step: whether the loss of any accumulated batch, or any gradient, is NaN/inf; under DDP
    one all-reduce so every rank takes the same decision; one host sync. On a bad step:

    - default: raise ``NonFiniteError`` naming the method, the global step and the non-finite terms the
      method logged (e.g. ``train/off_diag``); the update is not applied.
    - ``skip_nonfinite=True``: drop the step's gradients (``grad = None``: SGD, AdamW and LARS then leave
      the weights and their momentum/Adam state untouched; the learning-rate schedule and ``global_step``
      still advance, as with a gradient scaler's skipped step), count it in
      ``train/skipped_nonfinite_steps`` and go on; raise after more than ``max_skipped`` bad steps in a row.
    - with a gradient scaler (``precision="16-mixed"`` on GPU) overflow is the scaler's job: gradients are
      not checked, a non-finite loss is counted as skipped (the scaler skips it) and only more than
      ``max_skipped`` in a row stop the run.

    Also refuses (raises) to save a checkpoint whose weights are not finite.
    """

    def __init__(self, skip_nonfinite: bool = False, max_skipped: int = 10) -> None:
        if max_skipped < 0:
            raise ValueError(f"NonFiniteGuard: max_skipped must be >= 0, got {max_skipped}")
        self.skip_nonfinite = skip_nonfinite
        self.max_skipped = max_skipped
        self.skipped = 0  # bad steps skipped in the whole run (saved in checkpoints)
        self._in_a_row = 0
        self._loss_bad: Optional[torch.Tensor] = None

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self._in_a_row}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped, self._in_a_row = int(state_dict["skipped"]), int(state_dict["in_a_row"])

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.__dict__[_RECORD] = {}

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.__dict__.pop(_RECORD, None)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss_bad = self._loss_bad if self._loss_bad is not None else torch.tensor(False, device=pl_module.device)
        self._loss_bad = None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [g for g in local_shards(grads) if g.numel()]  # sharded (FSDP): this rank's shards; the reduce joins them
        grads_bad = torch.zeros_like(loss_bad)
        if scaler is None and grads:  # max |g| per tensor: NaN and inf propagate, no overflow
            grads_bad = ~torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all().to(loss_bad.device)
        flags = trainer.strategy.reduce(torch.stack([loss_bad, grads_bad]).float(), reduce_op="max")
        loss_bad_, grads_bad_ = (bool(flag) for flag in flags.tolist())  # the step's one host sync
        terms = pl_module.__dict__.get(_RECORD, {})
        pl_module.__dict__[_RECORD] = {}
        if loss_bad_ or grads_bad_:
            self._on_bad_step(trainer, pl_module, optimizer, self._describe(trainer, pl_module, terms, loss_bad_), scaler)
        else:
            self._in_a_row = 0
        if self.skip_nonfinite or scaler is not None:
            pl_module.log("train/skipped_nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False)

    def _on_bad_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any, problem: str, scaler: Any) -> None:
        if not self.skip_nonfinite and scaler is None:
            raise NonFiniteError(
                f"{problem}; the update was not applied (weights and checkpoints stay those of step "
                f"{trainer.global_step}). Lower the learning rate, or skip such steps with --safety.skip_nonfinite true "
                "(NonFiniteGuard(skip_nonfinite=True))"
            )
        self._in_a_row += 1
        self.skipped += 1
        if self._in_a_row > self.max_skipped:
            raise NonFiniteError(f"{problem}; {self._in_a_row} non-finite steps in a row (max_skipped={self.max_skipped})")
        if scaler is None:
            optimizer.zero_grad(set_to_none=True)
        rank_zero_warn(f"{problem}; step skipped ({self.skipped} so far)")

    @staticmethod
    def _describe(trainer: Trainer, pl_module: LightningModule, terms: dict[str, list[torch.Tensor]], loss_bad: bool) -> str:
        bad = [name for name, values in terms.items() if not all(bool(torch.isfinite(v).all()) for v in values)]
        if not bad:
            bad = ["loss (on another rank)" if loss_bad else "gradients"]
        return f"{type(pl_module).__name__}: non-finite {', '.join(bad)} at global step {trainer.global_step}"

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        tensors = {k: v for k, v in checkpoint["state_dict"].items() if torch.is_tensor(v) and v.is_floating_point()}
        if not tensors:
            return
        bad_flags = torch.stack([~torch.isfinite(v).all() for v in local_shards(list(tensors.values()))]).float()
        if any(sharding_of(v) for v in tensors.values()):  # a distributed checkpoint: each rank checks its shards
            bad_flags = trainer.strategy.reduce(bad_flags, reduce_op="max")
        bad = [name for name, flag in zip(tensors, bad_flags.tolist()) if flag]
        if bad:
            raise NonFiniteError(
                f"{type(pl_module).__name__}: refusing to save a checkpoint at global step {trainer.global_step}: "
                f"{len(bad)} non-finite tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
            )
