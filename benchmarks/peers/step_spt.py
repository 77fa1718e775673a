"""stable-pretraining's SimCLR / BYOL / MoCo v2 training step: its method modules (``spt.methods.SimCLR``,
``BYOL``, ``MoCov2``: heads, losses, queue) on our network, its ``LARS``, and after each step what its
``TeacherStudentCallback`` does (``update_ema_coefficient`` then ``update_teacher`` on every
``TeacherStudentWrapper``). No Trainer, so none of the callbacks its entry point adds to a Lightning run.
Worker of ``benchmarks/peers.py`` (``.venv-spt``)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from common import LossFn, UpdateFn, cifar_resnet18, serve
from stable_pretraining.methods import BYOL, MoCov2, SimCLR
from stable_pretraining.optim.lars import LARS

TOTAL_STEPS = 1000  # for BYOL's momentum schedule (the callback's epoch / max_epochs, here per step)


def build_step(method: str, width: int, batch: int, device: torch.device) -> tuple[LossFn, UpdateFn]:
    backbone = cifar_resnet18(width)
    if method == "simclr":
        model = SimCLR(backbone, projector_dims=(2048, 128), temperature=0.5)
        optimizer: torch.optim.Optimizer = LARS(model.parameters(), lr=0.3 * batch / 256, momentum=0.9,
                                                weight_decay=1e-6)
    elif method == "byol":
        model = BYOL(backbone, projector_dims=(4096, 256), predictor_dims=(4096, 256), ema_decay_start=0.996)
        optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=0.2 * batch / 256, momentum=0.9,
                         weight_decay=1.5e-6)
    elif method == "moco_v2":
        model = MoCov2(backbone, projector_dims=(2048, 128), queue_length=4096, temperature=0.2)
        model.queue.append(F.normalize(torch.randn(4096, 128), dim=1))  # a full queue from the first step, as ours
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03 * batch / 256,
                                    momentum=0.9, weight_decay=1e-4)
    else:
        raise ValueError(f"unknown method {method!r}")
    model = model.to(device).train()
    wrappers = [module for module in model.modules() if hasattr(module, "update_teacher")]
    steps = itertools.count()

    def loss_fn(view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        return model(view1, view2).loss

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step = next(steps) % TOTAL_STEPS
        for wrapper in wrappers:
            wrapper.update_ema_coefficient(step, TOTAL_STEPS)
            wrapper.update_teacher()

    return loss_fn, update


if __name__ == "__main__":
    serve(build_step)
