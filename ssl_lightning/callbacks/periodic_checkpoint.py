"""``PeriodicCheckpoint``: ``last.ckpt`` every N optimizer steps or every M minutes, whichever comes first."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

from lightning.pytorch.callbacks import ModelCheckpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that rewrites ``last.ckpt`` after every ``every_n_train_steps`` optimizer steps
    and whenever ``every_n_minutes`` of wall time have passed since its last time-triggered save (either
    may be None).

    Lightning's ``ModelCheckpoint`` already saves when either trigger fires (its ``on_train_batch_end``
    checks both, with rank 0 deciding the time trigger for all ranks) but refuses to be given both; this
    class sets the time trigger after construction. Defaults: ``save_last=True``, ``save_top_k=0`` (only
    ``last.ckpt``); any other ``ModelCheckpoint`` argument (``dirpath``, ...) passes through.
    """

    def __init__(
        self,
        every_n_train_steps: Optional[int] = None,
        every_n_minutes: Optional[float] = None,
        save_last: Optional[bool] = True,
        save_top_k: int = 0,
        **kwargs: Any,
    ) -> None:
        if every_n_train_steps is None and every_n_minutes is None:
            raise ValueError("PeriodicCheckpoint: set every_n_train_steps, every_n_minutes or both")
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise ValueError(f"PeriodicCheckpoint: every_n_minutes must be > 0, got {every_n_minutes}")
        interval = None if every_n_minutes is None else timedelta(minutes=every_n_minutes)
        if every_n_train_steps is None:
            super().__init__(train_time_interval=interval, save_last=save_last, save_top_k=save_top_k, **kwargs)
        else:
            super().__init__(every_n_train_steps=every_n_train_steps, save_last=save_last, save_top_k=save_top_k, **kwargs)
            self._train_time_interval = interval
