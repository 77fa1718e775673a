"""kNN monitor: weighted kNN top-1 of the backbone features during pretraining."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from ssl_lightning.distributed import all_reduce_max_, gather_variable_length, rank, world_size
from ssl_lightning.scoring import extract_features, knn_accuracy
from ssl_lightning.sharding import is_sharded


class KNNMonitor(Callback):
    """Log ``val/knn_top1`` (percent): bank = ``datamodule.train_eval_dataset()``, queries = ``val_dataset()``.

    Evaluates before training (optional), at the end of every ``every_n_epochs``-th validation epoch,
    and once more at the end of training unless the final weights were already evaluated, so the
    trained network is evaluated exactly once at the end. Each rank extracts its shard; the shards are
    gathered, so every rank computes the same value. Rows labelled -1 are left out. The evaluation runs
    under a forked RNG and does not change the training's random stream. With ``print_summary`` rank 0
    prints ``knn_top1 before=<acc> after=<acc> seconds=<s>`` at the end of ``fit``, where ``seconds``
    runs from the first evaluation (or the start of training) to the end of the last one.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 200,
        temperature: float = 0.1,
        evaluate_before_training: bool = True,
        print_summary: bool = True,
    ) -> None:
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.evaluate_before_training = evaluate_before_training
        self.print_summary = print_summary
        self.before: float | None = None
        self.after: float | None = None
        self.enabled = False
        self._warned = False
        self._start = 0.0
        self._end = 0.0
        self._evaluated_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.enabled = getattr(trainer.datamodule, "num_classes", None) is not None
        if not self.enabled and not self._warned:
            rank_zero_info("KNNMonitor: the data has no labels, the kNN monitor is disabled.")
            self._warned = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        if self.enabled and self.evaluate_before_training:
            self.before = self._evaluate(trainer, pl_module)
            self._log_to_loggers(trainer, self.before)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if self._evaluated_step == trainer.global_step:
            return
        self.after = self._evaluate(trainer, pl_module)
        # equal on every rank: "max" keeps it exact and spares Lightning's warning about unsynced epoch values
        pl_module.log("val/knn_top1", self.after, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and self._evaluated_step != trainer.global_step:
            self.after = self._evaluate(trainer, pl_module)
            self._log_to_loggers(trainer, self.after)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and self.print_summary and trainer.is_global_zero:
            before = float("nan") if self.before is None else self.before
            after = float("nan") if self.after is None else self.after
            print(f"knn_top1 before={before:.2f} after={after:.2f} seconds={self._end - self._start:.1f}", flush=True)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """kNN top-1 of the current weights; identical on every rank."""
        dm = trainer.datamodule
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context():
            bank, bank_labels = self._features(pl_module, dm.eval_loader(dm.train_eval_dataset(), rank(), world_size()))
            query, query_labels = self._features(pl_module, dm.eval_loader(dm.val_dataset(), rank(), world_size()))
        top1, _ = knn_accuracy(query, query_labels, bank, bank_labels, dm.num_classes, self.k, self.temperature)
        self._evaluated_step = trainer.global_step
        self._end = time.perf_counter()
        return top1

    @staticmethod
    def _features(pl_module: pl.LightningModule, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of features, gathered; a sharded (FSDP) model runs as many forwards on every rank as
        the rank with the most batches (its parameters are all-gathered in each forward)."""
        forwards = None
        if is_sharded(pl_module):
            forwards = int(all_reduce_max_(torch.tensor(len(loader), device=pl_module.device)))
        features, labels = extract_features(pl_module, loader, pl_module.device, forwards)
        features, labels = gather_variable_length(features), gather_variable_length(labels)
        labelled = labels >= 0
        return features[labelled], labels[labelled]

    @staticmethod
    def _log_to_loggers(trainer: pl.Trainer, top1: float) -> None:
        """Log outside a loop, where ``LightningModule.log`` is not allowed (loggers write on rank 0 only)."""
        for logger in trainer.loggers:
            logger.log_metrics({"val/knn_top1": top1}, step=trainer.global_step)

