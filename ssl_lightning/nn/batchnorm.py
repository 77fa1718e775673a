"""BatchNorm helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers of ``module`` still normalize with the batch's statistics in
    training mode but leave their running averages unchanged (momentum 0).

    For inputs unlike those seen at evaluation (jigsaw tiles): the running statistics then come from the
    passes on whole images only, which evaluation uses.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
