"""Online linear probe: a linear classifier trained on detached features during pretraining."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.utils import skip_init
from torchmetrics.classification import MulticlassAccuracy

from ssl_lightning.distributed import all_reduce_mean_, world_size


class OnlineLinearProbe(Callback):
    """Train ``nn.Linear(backbone.feature_dim, num_classes)`` on ``outputs["features"]`` after each batch.

    The head and its optimizer belong to the callback, so no gradient reaches the backbone and the
    method's optimizer never sees the head. Rows labelled -1 are ignored. The head starts at zero, which
    keeps it identical on all ranks and leaves the global RNG untouched; under DDP its gradients are
    averaged across ranks before each step. Logs ``train/probe_loss`` (written at the trainer's
    ``log_every_n_steps``) and ``val/probe_top1`` in percent, like ``val/knn_top1`` and ``ssl-lightning eval``
    (micro-averaged over the validation epoch, synced across ranks).
    """

    def __init__(self, lr: float = 1e-3, optimizer: Literal["adam", "sgd"] = "adam", weight_decay: float = 0.0) -> None:
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.head: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.val_top1: MulticlassAccuracy | None = None
        self._warned = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        num_classes = getattr(trainer.datamodule, "num_classes", None)
        if num_classes is None:
            if not self._warned:
                rank_zero_info("OnlineLinearProbe: the data has no labels, the online linear probe is disabled.")
                self._warned = True
            return
        if self.head is None:
            # skip_init: nn.Linear's random init would draw from the global RNG and shift the training's stream
            self.head = skip_init(nn.Linear, pl_module.backbone.feature_dim, num_classes)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            self.optimizer = self._make_optimizer(self.head.parameters())
            self.val_top1 = MulticlassAccuracy(num_classes, average="micro", ignore_index=-1)
        self.head.to(pl_module.device)
        self.val_top1.to(pl_module.device)

    def _make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        raise ValueError(f"unknown probe optimizer {self.optimizer_name!r} (use 'adam' or 'sgd')")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.head is None:
            return
        features = outputs["features"].detach().float()
        labels = batch["label"]
        with torch.enable_grad():
            # Per-row losses with -1 rows at zero: skipping them without a host sync, and a batch with
            # no labels gives a zero gradient instead of NaN.
            losses = F.cross_entropy(self.head(features), labels, ignore_index=-1, reduction="none")
            loss = losses.sum() / (labels >= 0).sum().clamp(min=1)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if world_size() > 1:
            self._average_gradients()
        self.optimizer.step()
        pl_module.log("train/probe_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=labels.shape[0])

    def _average_gradients(self) -> None:
        grads = [p.grad for p in self.head.parameters()]
        flat = all_reduce_mean_(torch.cat([g.reshape(-1) for g in grads]))
        for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(avg.view_as(g))

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.head is None or trainer.sanity_checking:
            return
        self.val_top1.update(self.head(outputs["features"].detach().float()), batch["label"])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.head is None or trainer.sanity_checking or not self.val_top1.update_called:
            return
        top1 = self.val_top1.compute() * 100  # synced across ranks: equal on every rank
        self.val_top1.reset()
        # "max" of equal values keeps it exact and spares Lightning's warning about unsynced epoch values
        pl_module.log("val/probe_top1", top1, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")

    def state_dict(self) -> dict[str, Any]:
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore head and optimizer (Lightning calls this after ``setup``, with the head on its device)."""
        if self.head is None or not state_dict:
            return
        self.head.load_state_dict(state_dict["head"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
