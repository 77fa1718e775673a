"""Our SimCLR / BYOL / MoCo v2 step: the method's ``training_step`` on a batch of two views, backward, the
optimizer the method's recipe names (LARS for SimCLR and BYOL, SGD for MoCo v2) and the work its callbacks do
after a step (``MomentumUpdate``'s EMA, ``QueueUpdate``'s enqueue), outside a Trainer (``log`` is a no-op).
Worker of ``benchmarks/peers.py`` (our environment)."""

from __future__ import annotations

from typing import Any

import torch
from common import LossFn, UpdateFn, serve

from ssl_lightning.callbacks.momentum import MomentumUpdate, ema_update_, scheduled_momentum
from ssl_lightning.callbacks.queue import enqueue_
from ssl_lightning.methods import BYOL, MoCoV2, SimCLR
from ssl_lightning.optim import OptimConfig, build_optimizer

TOTAL_STEPS = 1000  # for BYOL's momentum schedule
SIMCLR_OPTIM = OptimConfig(name="lars", lr=0.3, weight_decay=1e-6)
RECIPES: dict[str, tuple[type, OptimConfig, dict[str, Any]]] = {
    "simclr": (SimCLR, SIMCLR_OPTIM, {}),
    "simclr_separate": (SimCLR, SIMCLR_OPTIM, {"view_batch_norm": "separate"}),  # one backbone call per view
    "byol": (BYOL, OptimConfig(name="lars", lr=0.2, weight_decay=1.5e-6), {}),
    "moco_v2": (MoCoV2, OptimConfig(name="sgd", lr=0.03, weight_decay=1e-4), {}),
}


def build_step(method: str, width: int, batch: int, device: torch.device) -> tuple[LossFn, UpdateFn]:
    cls, optim, options = RECIPES[method]
    model = cls(backbone="cifar_resnet18", backbone_kwargs={"base_width": width}, optim=optim, **options).to(device).train()
    model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer: logging is off here
    optimizer = build_optimizer(optim, model.optimized_modules(), batch)
    pairs = [pair for callback in model.configure_callbacks() if isinstance(callback, MomentumUpdate)
             for pair in callback.pairs]  # the (online, target) submodules the method's own callback averages
    onlines = [p for online, _ in pairs for p in model.get_submodule(online).parameters()]
    targets = [p for _, target in pairs for p in model.get_submodule(target).parameters()]
    state: dict[str, Any] = {"step": 0}

    def loss_fn(view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        state["output"] = model.training_step({"views": [view1, view2]}, 0)
        return state["output"]["loss"]

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if targets:
            ema_update_(targets, onlines, momentum_at(model, state["step"]))
        if method == "moco_v2":
            enqueue_(model.queue, model.queue_ptr, state["output"]["keys"])
        state["step"] += 1

    return loss_fn, update


def momentum_at(model: torch.nn.Module, step: int) -> float:
    """BYOL's cosine schedule (over ``TOTAL_STEPS``, as the peers'), MoCo's constant momentum."""
    if isinstance(model, BYOL):
        return scheduled_momentum(step % TOTAL_STEPS, TOTAL_STEPS, model.base_momentum, model.final_momentum)
    return model.momentum


if __name__ == "__main__":
    serve(build_step)
