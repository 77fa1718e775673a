"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"):
crops are mapped to soft codes over learned prototypes by Sinkhorn-Knopp, and each crop predicts the code
of the other crops (swapped prediction), with multi-crop and an optional queue of past embeddings."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ssl_lightning.callbacks.queue import QueueUpdate
from ssl_lightning.distributed import rank, world_size
from ssl_lightning.losses import sinkhorn_knopp, swav_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class SwAV(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim: the projector (linear, BatchNorm, ReLU, linear: 2048 -> 128);
            its output is L2-normalized.
        num_prototypes: K, the prototypes (3000 on ImageNet), a linear layer without bias whose rows are
            kept unit-norm: normalized at construction and after every optimizer step.
        temperature: of the softmax over prototype scores in the swapped prediction (0.1).
        epsilon, sinkhorn_iterations: Sinkhorn-Knopp's entropy weight (0.05) and iterations (3). A loss that
            stays at ln K means nearly uniform codes and a collapsed run: a lower epsilon (0.03) sharpens
            the codes (the official README's remedy; the bundled CIFAR-10 subset needs it).
        crops_for_assign: the crops whose codes are predicted (the two global views, ``[0, 1]``).
        freeze_prototypes_steps: optimizer steps during which the prototypes get no update (313 on ImageNet,
            one epoch): their gradient is dropped (``None``, as the paper's code), so neither the
            optimizer nor weight decay moves them.
        queue_length: past embeddings of the assignment crops kept to enlarge the batch Sinkhorn sees
            (0: none; 3840 for batches of 256). As in the paper's code, only whole global batches count:
            the length used is ``queue_length`` rounded down to a multiple of the global batch, so with
            batches of 4096 the ImageNet recipe's 3840 means no queue.
        queue_start_epoch: the first epoch whose codes use the queue (15 on ImageNet). The queue is filled
            from the first step on (one all-gather of the assignment crops' embeddings per step), so it is
            full when that epoch starts; the paper's code starts filling at that epoch and waits until full.
            Either way only full queues of recent embeddings are used.

    The queue is a buffer (``queue_length``, assignment crops, ``projection_dim``) filled after each
    optimizer step by ``QueueUpdate`` with the embeddings gathered from ALL ranks, so it is the same on every
    rank: DDP's broadcast of buffers from rank 0 at each forward (``broadcast_buffers=True``, which a module
    cannot switch off) leaves it intact, it is checkpointed with the module and a run can resume on another
    number of devices. Each rank scores its own slice of the queue before Sinkhorn-Knopp; the global
    problem holds every queued embedding once, as one process with the whole queue (the paper's code keeps
    one queue per rank of its own samples instead, and saves it outside the checkpoint).
    """

    def __init__(
        self,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: Sequence[int] = (0, 1),
        freeze_prototypes_steps: int = 313,
        queue_length: int = 0,
        queue_start_epoch: int = 15,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_prototypes < 1 or queue_length < 0 or freeze_prototypes_steps < 0 or queue_start_epoch < 0:
            raise ValueError(
                f"num_prototypes must be positive and queue_length, freeze_prototypes_steps, queue_start_epoch "
                f"non-negative, got {num_prototypes}, {queue_length}, {freeze_prototypes_steps}, {queue_start_epoch}"
            )
        self.crops_for_assign = [int(i) for i in crops_for_assign]
        assign = self.crops_for_assign
        if not assign or min(assign) < 0 or len(set(assign)) != len(assign):
            raise ValueError(f"crops_for_assign must be distinct non-negative crop indices, got {list(crops_for_assign)}")
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.queue_length, self.queue_start_epoch = queue_length, queue_start_epoch
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, num_layers=2)
        self.prototypes = nn.Linear(projection_dim, num_prototypes, bias=False)
        self.normalize_prototypes()
        if queue_length:
            self.register_buffer("queue", torch.zeros(queue_length, len(self.crops_for_assign), projection_dim))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def configure_callbacks(self) -> list[Callback]:
        return [QueueUpdate()] if self.queue_length else []

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Put the prototypes back on the unit sphere (the paper's code does it before every step)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.normalize_prototypes()

    def on_after_backward(self) -> None:
        if self.global_step < self.freeze_prototypes_steps:
            self.prototypes.weight.grad = None

    def used_queue_length(self) -> int:
        """Queue rows used now: whole global batches (paper's code), once filled and from ``queue_start_epoch``."""
        if not self.queue_length or self.current_epoch < self.queue_start_epoch:
            return 0
        batch = self.global_batch_size()
        length = self.queue_length - self.queue_length % batch
        filled = self.global_step * batch  # QueueUpdate enqueues one global batch per optimizer step
        return length if filled >= length else 0

    def on_train_start(self) -> None:
        batch = self.global_batch_size()
        if self.queue_length and self.queue_length % batch:
            rank_zero_warn(
                f"SwAV: the queue keeps whole global batches ({batch} embeddings each), so it uses "
                f"{self.queue_length - self.queue_length % batch} of queue_length={self.queue_length} rows"
            )

    @torch.no_grad()
    def codes(self, scores: torch.Tensor, crop: int) -> torch.Tensor:
        """Sinkhorn-Knopp codes (B, K) of this rank's batch scores for assignment crop number ``crop``,
        the queue's embeddings (this rank's slice) joining the batch from ``queue_start_epoch`` on."""
        batch_size, used = scores.shape[0], self.used_queue_length()
        if used:
            recent = (self.queue_ptr - used + torch.arange(used, device=scores.device)) % self.queue_length
            mine = torch.tensor_split(self.queue[recent, crop], world_size())[rank()]
            scores = torch.cat([scores, self.prototypes(mine.to(self.prototypes.weight.dtype)).to(scores.dtype)])
        return sinkhorn_knopp(scores, self.epsilon, self.sinkhorn_iterations)[:batch_size]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        if len(views) < 2 or max(self.crops_for_assign) >= len(views):
            raise ValueError(f"SwAV needs at least 2 views including crops_for_assign {self.crops_for_assign}, "
                             f"got batch['views'] with {len(views)}")
        if any(v.shape[0] != views[0].shape[0] for v in views):
            raise ValueError(f"batch['views'] must share one batch size, got {[tuple(v.shape) for v in views]}")
        features = self.features_by_resolution(views)
        embeddings = F.normalize(self.projector(torch.cat(features)), dim=1)  # one BatchNorm over all crops
        scores = self.prototypes(embeddings).chunk(len(views))
        codes = [self.codes(scores[i].detach(), j) for j, i in enumerate(self.crops_for_assign)]
        loss = swav_loss(scores, codes, self.crops_for_assign, self.temperature)
        self.log("train/loss", loss, prog_bar=True)
        z = embeddings.detach().chunk(len(views))
        out = {"loss": loss, "features": features[0].detach(), "embeddings": z[0]}
        if self.queue_length:
            out["keys"] = torch.stack([z[i] for i in self.crops_for_assign], dim=1)  # (B, crops, D)
        return out
