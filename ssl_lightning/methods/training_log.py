"""``TrainingLog``: the ``log`` of every method, which keeps training values for ``NonFiniteGuard`` and never makes
a step wait for the device to show a value in the progress bar."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

from ssl_lightning.callbacks.nonfinite import record_train_value


class TrainingLog(LightningModule):
    """A ``LightningModule`` whose ``log`` also keeps each ``train/`` tensor for ``NonFiniteGuard`` (to name the
    term at fault) and sends training tensors logged with ``prog_bar=True`` to the bar through
    ``progress_bar_names``: Lightning copies every progress-bar tensor to the host after each step (on a GPU, a
    sync per step), while ``LogFriendlyProgressBar`` reads these only when it redraws."""

    @property
    def progress_bar_names(self) -> set[str]:
        """The training values the progress bar shows, read from ``trainer.callback_metrics`` at its redraws."""
        return self.__dict__.setdefault("_progress_bar_names", set())

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        record_train_value(self, name, value)
        if kwargs.get("prog_bar") and isinstance(value, torch.Tensor) and self._trainer is not None and self._trainer.training:
            kwargs["prog_bar"] = False
            self.progress_bar_names.add(name)
        super().log(name, value, *args, **kwargs)
