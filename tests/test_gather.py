"""Our autograd-aware gather and all-reduce (replacing the deprecated ``torch.distributed.nn.functional`` ones):
2 gloo processes give the gradient of one process on the full batch, and raise no warning."""

from __future__ import annotations

import warnings

import torch

from ssl_lightning.distributed import all_reduce_sum_with_grad, gather_with_grad
from tests.ddp_utils import run_distributed


def gather_loss(x: torch.Tensor, layer: torch.nn.Linear, gather) -> torch.Tensor:
    """Each local row against the rows of the global batch (the shape of a contrastive loss)."""
    local = layer(x)
    return torch.logsumexp(local @ gather(local).T, dim=1).mean()


def sum_loss(x: torch.Tensor, layer: torch.nn.Linear, reduce_sum) -> torch.Tensor:
    """A loss of the global sum of the embeddings, the same on every rank (the shape of Barlow/VICReg statistics)."""
    return reduce_sum(layer(x).sum(dim=0)).tanh().pow(2).sum()


def _ddp_grads(rank: int, world_size: int, x: torch.Tensor, weight: torch.Tensor) -> dict:
    layer = torch.nn.Linear(x.shape[1], weight.shape[0], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    shard = x.chunk(world_size)[rank]
    grads = {}
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.simplefilter("error", category)
        for name, loss_fn, op in (("gather", gather_loss, gather_with_grad), ("sum", sum_loss, all_reduce_sum_with_grad)):
            layer.zero_grad()
            loss_fn(shard, layer, op).backward()
            grad = layer.weight.grad.clone()
            torch.distributed.all_reduce(grad)  # DDP averages the ranks' gradients
            grads[name] = grad / world_size
    return grads


def test_two_processes_match_one_on_the_full_batch_without_warnings() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64, generator=generator)
    weight = torch.randn(3, 5, dtype=torch.float64, generator=generator) * 0.5
    ddp = run_distributed(_ddp_grads, 2, x, weight)  # raises if any call warned

    for name, loss_fn in (("gather", gather_loss), ("sum", sum_loss)):
        layer = torch.nn.Linear(5, 3, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.zero_()
        loss_fn(x, layer, lambda t: t).backward()  # one process: the gather and the sum are the identity
        assert layer.weight.grad.abs().max() > 1e-3
        torch.testing.assert_close(ddp[name], layer.weight.grad)
