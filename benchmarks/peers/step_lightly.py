"""lightly's SimCLR / BYOL / MoCo v2 training step, written as lightly's examples write them: its projection
and prediction heads, ``NTXentLoss`` (with a memory bank for MoCo), ``NegativeCosineSimilarity``,
``update_momentum`` and ``cosine_schedule``, its ``LARS``. Worker of ``benchmarks/peers.py`` (``.venv-lightly``)."""

from __future__ import annotations

import copy

import torch
from common import LossFn, UpdateFn, cifar_resnet18, serve
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, MoCoProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.lars import LARS
from lightly.utils.scheduler import cosine_schedule

TOTAL_STEPS = 1000  # for BYOL's momentum schedule


def build_step(method: str, width: int, batch: int, device: torch.device) -> tuple[LossFn, UpdateFn]:
    backbone = cifar_resnet18(width).to(device)
    features = 8 * width
    if method == "simclr":
        head = SimCLRProjectionHead(features, 2048, 128).to(device)
        criterion = NTXentLoss(temperature=0.5).to(device)
        optimizer = LARS([*backbone.parameters(), *head.parameters()], lr=0.3 * batch / 256, momentum=0.9,
                         weight_decay=1e-6)

        def loss_fn(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
            return criterion(head(backbone(x0)), head(backbone(x1)))

        return loss_fn, _updater(optimizer)
    if method == "byol":
        projector = BYOLProjectionHead(features, 4096, 256).to(device)
        predictor = BYOLPredictionHead(256, 4096, 256).to(device)
        backbone_momentum, projector_momentum = copy.deepcopy(backbone), copy.deepcopy(projector)
        deactivate_requires_grad(backbone_momentum)
        deactivate_requires_grad(projector_momentum)
        criterion = NegativeCosineSimilarity()
        optimizer = LARS([*backbone.parameters(), *projector.parameters(), *predictor.parameters()],
                         lr=0.2 * batch / 256, momentum=0.9, weight_decay=1.5e-6)
        steps = iter(range(10**9))

        def loss_fn(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
            momentum = cosine_schedule(next(steps) % TOTAL_STEPS, TOTAL_STEPS, 0.996, 1.0)
            update_momentum(backbone, backbone_momentum, m=momentum)
            update_momentum(projector, projector_momentum, m=momentum)
            p0, p1 = predictor(projector(backbone(x0))), predictor(projector(backbone(x1)))
            with torch.no_grad():
                z0, z1 = projector_momentum(backbone_momentum(x0)), projector_momentum(backbone_momentum(x1))
            return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

        return loss_fn, _updater(optimizer)
    if method == "moco_v2":
        projector = MoCoProjectionHead(features, 2048, 128).to(device)
        backbone_momentum, projector_momentum = copy.deepcopy(backbone), copy.deepcopy(projector)
        deactivate_requires_grad(backbone_momentum)
        deactivate_requires_grad(projector_momentum)
        criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128)).to(device)
        optimizer = torch.optim.SGD([*backbone.parameters(), *projector.parameters()], lr=0.03 * batch / 256,
                                    momentum=0.9, weight_decay=1e-4)

        def loss_fn(x_query: torch.Tensor, x_key: torch.Tensor) -> torch.Tensor:
            update_momentum(backbone, backbone_momentum, m=0.999)
            update_momentum(projector, projector_momentum, m=0.999)
            query = projector(backbone(x_query))
            with torch.no_grad():
                key = projector_momentum(backbone_momentum(x_key))
            return criterion(query, key)

        return loss_fn, _updater(optimizer)
    raise ValueError(f"unknown method {method!r}")


def _updater(optimizer: torch.optim.Optimizer) -> UpdateFn:
    def update(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return update


if __name__ == "__main__":
    serve(build_step)
