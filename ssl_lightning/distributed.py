"""Small helpers for code that must give the same result on one process and on many."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward sums the gathered gradient over ranks and returns this rank's rows.

    Our own instead of ``torch.distributed.nn.functional.all_gather``, deprecated in torch 2.14 (a warning on
    every call). Gloo has no reduce-scatter, hence all-reduce then slice."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd may still hold ``grad``
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradient over ranks (every rank's loss reads the sum)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, in rank order, keeping the autograd graph.

    The backward pass sums the incoming gradients over ranks, so each rank's local rows receive the
    gradient of every rank's loss (what a single process on the full batch computes). Every rank must
    pass the same shape.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks, keeping the autograd graph (``tensor`` itself on one process).

    The backward pass sums the incoming gradients over ranks, as ``gather_with_grad`` does: when every
    rank computes the same loss from the sum, DDP's averaging gives the gradient of one process.
    """
    if not is_distributed():
        return tensor
    return _AllReduceSumWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, in rank order, without gradient."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks in place (a no-op on one process)."""
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


@torch.no_grad()
def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op on one process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over ranks, in place (a no-op on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_variable_length(tensor: torch.Tensor) -> torch.Tensor:
    """Gather rows of different counts per rank (no gradient), in rank order, dropping padding."""
    if not is_distributed():
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = gather_no_grad(count).tolist()
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = gather_no_grad(padded)
    rows = [gathered[i * max(counts) : i * max(counts) + n] for i, n in enumerate(counts)]
    return torch.cat(rows, dim=0)


@torch.no_grad()
def shuffle_across_ranks(tensor: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Shuffle-BN's shuffle (He et al. 2020, sec. 3.3): this rank's slice of a random permutation of the
    global batch, and the index that undoes it (``None`` on one process, where the batch is returned as
    is: the statistics of one BatchNorm over the whole batch do not depend on its order).

    The permutation drawn from ``generator`` on rank 0 is broadcast, so every rank uses the same one.
    Every rank must pass the same number of rows.
    """
    if not is_distributed():
        return tensor, None
    gathered = gather_no_grad(tensor)
    permutation = torch.randperm(gathered.shape[0], generator=generator, device=generator.device).to(tensor.device)
    dist.broadcast(permutation, src=0)
    mine = permutation.view(dist.get_world_size(), -1)[dist.get_rank()]
    return gathered[mine], torch.argsort(permutation)


@torch.no_grad()
def unshuffle_across_ranks(tensor: torch.Tensor, unshuffle: Optional[torch.Tensor]) -> torch.Tensor:
    """Undo ``shuffle_across_ranks``: the rows of ``tensor`` computed from the shuffled slices, returned
    to the rank and position of the samples they came from."""
    if unshuffle is None:
        return tensor
    gathered = gather_no_grad(tensor)
    return gathered[unshuffle.view(dist.get_world_size(), -1)[dist.get_rank()]]
