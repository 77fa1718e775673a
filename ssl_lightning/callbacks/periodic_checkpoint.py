"""``PeriodicCheckpoint``: ``last.ckpt`` at each epoch end and every N optimizer steps or every M minutes,
whichever comes first."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

from lightning.pytorch.callbacks import ModelCheckpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that rewrites ``last.ckpt`` at the end of every training epoch, after every
    ``every_n_train_steps`` optimizer steps and whenever ``every_n_minutes`` of wall time have passed since its
    last time-triggered save (either may be None).

    Lightning 2.6's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes ``last.ckpt`` at an epoch end only
    when a top-k checkpoint was saved at that step, i.e. with ``save_top_k=0`` only when training ends; a run
    pre-empted on day 3 would have none. ``last.ckpt`` is always the same file (no ``last-v1.ckpt`` after a
    resume): it is this run's newest state, written atomically by ``AtomicCheckpointIO``.

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
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs["enable_version_counter"] = enable_version_counter
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise ValueError(f"PeriodicCheckpoint: every_n_minutes must be > 0, got {every_n_minutes}")
        interval = None if every_n_minutes is None else timedelta(minutes=every_n_minutes)
        if every_n_train_steps is None:
            super().__init__(train_time_interval=interval, save_last=save_last, save_top_k=save_top_k, **kwargs)
        else:
            super().__init__(every_n_train_steps=every_n_train_steps, save_last=save_last, save_top_k=save_top_k, **kwargs)
            self._train_time_interval = interval

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):  # not already saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
