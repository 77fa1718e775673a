"""Run a function on N CPU processes with the gloo backend and collect what rank 0 returns."""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> Any:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; returns rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world_size, _free_port(), fn, args, out_path), nprocs=world_size, join=True)
        return torch.load(out_path, weights_only=True)


def as_one_process(loss: torch.Tensor, grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """What one process on the full batch holds, from each rank's ``loss`` and its gradients with respect to its
    rows of each input: the mean of the ranks' losses, and per input the ranks' gradients concatenated in rank
    order and divided by the world size (DDP's average). Unchanged on one process (no process group)."""
    if not dist.is_initialized():
        return loss.detach(), tuple(grads)
    world_size = dist.get_world_size()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    full = []
    for grad in grads:
        parts = [torch.zeros_like(grad) for _ in range(world_size)]
        dist.all_gather(parts, grad.contiguous())
        full.append(torch.cat(parts) / world_size)
    return mean / world_size, tuple(full)
