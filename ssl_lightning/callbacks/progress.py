"""A progress bar that moves on short epochs too (log files stay short on long ones) and reads the training
values it shows only when it redraws."""

from __future__ import annotations

import math

from typing import Any, Union

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


class LogFriendlyProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose refresh interval is at most a tenth of the bar's length.

    With Lightning's fixed ``refresh_rate`` (50 in ``configs/base.yaml``, to keep log files readable) a
    39-step epoch (e.g. the bundled data on 2 DDP ranks) shows 0/39 until its end; here it refreshes every
    ``min(refresh_rate, ceil(total / 10))`` batches, and at the last batch.
    """

    def _should_update(self, current: int, total: int) -> bool:
        rate = self.refresh_rate
        if isinstance(total, int) and 0 < total < math.inf:
            rate = max(1, min(rate, math.ceil(total / 10)))
        return self.is_enabled and (current % rate == 0 or current == total)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Union[int, str, float, dict[str, Any]]]:
        """Lightning's items plus the training values a method shows in the bar (``SSLMethod.progress_bar_names``):
        copied to the host here, at each redraw, not after every step."""
        items = super().get_metrics(trainer, pl_module)
        for name in sorted(getattr(pl_module, "progress_bar_names", ())):
            value = trainer.callback_metrics.get(name)
            if value is not None:
                items[name] = float(value)
        return items
