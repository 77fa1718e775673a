"""MoCo's dictionary queue (He et al. 2020, sec. 3.1): the keys of recent batches, oldest replaced first."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ssl_lightning.distributed import gather_no_grad


@torch.no_grad()
def enqueue_(queue: torch.Tensor, pointer: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` (N, D) into ``queue`` (K, D) from row ``pointer`` on, wrapping around; move the pointer.

    With more keys than rows only the newest ``K`` are kept. ``pointer`` is a 0-d integer tensor, updated
    in place on its device (no host synchronization).
    """
    size, count = queue.shape[0], keys.shape[0]
    kept = keys[-size:]
    first = count - kept.shape[0]  # index in ``keys`` of the first key kept
    rows = (pointer + first + torch.arange(kept.shape[0], device=queue.device)) % size
    queue[rows] = kept.to(queue.dtype)
    pointer.copy_((pointer + count) % size)


class QueueUpdate(Callback):
    """After each optimizer step, enqueue the keys of its batches, gathered from all ranks in rank order.

    The method owns the queue as two buffers (``queue`` (K, D) of normalized keys and ``pointer`` (0-d
    long)), so it is checkpointed and moved to the device with the module; its ``training_step`` returns
    the batch's keys under ``output_key``. Every rank enqueues the same gathered keys, so the queues stay
    identical (DDP broadcasts buffers from rank 0 at each forward anyway). Under gradient accumulation the
    keys of all micro-batches of a step are enqueued together after the step, as one large batch would.

    Args:
        queue: name of the queue buffer of the method.
        pointer: name of the pointer buffer of the method.
        output_key: where ``training_step``'s output holds the keys.
    """

    def __init__(self, queue: str = "queue", pointer: str = "queue_ptr", output_key: str = "keys") -> None:
        self.queue_name, self.pointer_name, self.output_key = queue, pointer, output_key
        self._pending: list[torch.Tensor] = []
        self._last_step: Optional[int] = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending = []
        self._last_step = trainer.global_step  # restored from the checkpoint on resume

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, dict) or self.output_key not in outputs:
            raise KeyError(f"QueueUpdate: training_step must return the keys to enqueue under {self.output_key!r}")
        self._pending.append(outputs[self.output_key].detach())
        if trainer.global_step == self._last_step:
            return  # accumulating gradients: the keys wait for the optimizer step
        self._last_step = trainer.global_step
        keys = gather_no_grad(torch.cat(self._pending))
        self._pending = []
        enqueue_(getattr(pl_module, self.queue_name), getattr(pl_module, self.pointer_name), keys)
