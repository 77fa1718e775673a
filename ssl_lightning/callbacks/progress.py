"""A progress bar that moves on short epochs too (log files stay short on long ones)."""

from __future__ import annotations

import math

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
