"""``PreemptionCheckpoint``: on SIGTERM or SLURM's requeue signal, stop at the end of the current optimizer
step, save ``last.ckpt`` there, exit non-zero and (SLURM) requeue the job.

Why not Lightning's own handlers: its SLURM handler saves ``hpc_ckpt_N.ckpt`` from inside the signal
handler, i.e. in the middle of a step, and its SIGTERM handler runs a collective inside the handler and
stops each rank at the batch where *that* rank got the signal; ranks signalled at different batches then
wait on each other. Here the handlers only set a flag, all ranks agree on it (one all-reduce per optimizer
step, only under DDP) and stop at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional, Union

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


def preempted_exit_code(signal_name: str) -> int:
    """The exit code of a run stopped by ``signal_name``: 128 + the signal number, as a shell reports a
    process killed by it (SIGTERM 143, SIGUSR1 138). SLURM's requeue does not depend on it."""
    return 128 + signal.Signals[signal_name].value


PREEMPTED_EXIT_CODE = preempted_exit_code("SIGTERM")


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue_slurm_job(job_id: str) -> int:
    """Run ``scontrol requeue job_id``; returns its exit status (logged, never raised: the checkpoint is saved)."""
    try:
        status = subprocess.run(["scontrol", "requeue", job_id], check=False).returncode
    except OSError as error:
        log.warning(f"could not requeue SLURM job {job_id}: {error}")
        return -1
    if status == 0:
        log.info(f"requeued SLURM job {job_id}")
    else:
        log.warning(f"scontrol requeue {job_id} failed with exit status {status}")
    return status


class PreemptionCheckpoint(Callback):
    """Stop at the end of the current optimizer step on SIGTERM or on the requeue signal (SLURMEnvironment's
    ``requeue_signal``, else SIGUSR1), save a checkpoint of that step and exit non-zero.

    - The run stops at the first optimizer-step boundary after the signal (mid-epoch included; with
      gradient accumulation, at the end of the accumulation), after validation if one is running.
    - The checkpoint is ``last.ckpt`` in the first ``ModelCheckpoint``'s folder (the one with ``save_last``
      if any), where ``fit(ckpt_path="last")`` finds it; without a ``ModelCheckpoint``, in
      ``<default_root_dir>/checkpoints/``. It is saved once every hook of the step has run, so the resumed
      run is identical to an uninterrupted one. Saving is collective: every rank calls it.
    - The exception Lightning raises (``SIGTERMException``, a ``SystemExit``) gets exit code 128 + signal
      number (``preempted_exit_code``): 143 for SIGTERM, 138 for SIGUSR1. ``preempted_by`` names the signal.
    - Under SLURM with ``SLURMEnvironment(auto_requeue=True)`` (Lightning's default there), the requeue
      signal also makes rank 0 run ``scontrol requeue`` after the save (SIGTERM does not: it is what
      ``scancel`` sends). The handler is installed at ``setup``, so Lightning's own mid-step SLURM handler
      is never installed.
    """

    def __init__(self) -> None:
        self.preempted_by: Optional[str] = None
        self.checkpoint_path: Optional[str] = None
        self._received: Optional[int] = None
        self._requeue_signal = signal.SIGUSR1
        self._original: dict[int, _Handler] = {}
        self._last_step = 0

    # ---- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        log.info(f"received {signal.Signals(signum).name}: stopping at the end of this optimizer step")
        if self._received != self._requeue_signal:  # the requeue signal wins over SIGTERM
            self._received = signum

    def _install(self, signum: int) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signum, self._on_signal)

    def _restore(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._original.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            # Lightning's teardown (after ``on_exception``) restores what it found at fit start: ours.
            lightning_saved = trainer._signal_connector._original_handlers
            if signum in lightning_saved:
                lightning_saved[signum] = handler

    # ---- hooks -------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.preempted_by, self.checkpoint_path, self._received = None, None, None
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.requeue_signal is not None:
            self._requeue_signal = environment.requeue_signal
        self._original = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, self._requeue_signal)}
        self._install(self._requeue_signal)  # before Trainer._run registers Lightning's handlers

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        self._install(signal.SIGTERM)  # replaces the handler Lightning has just registered

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # inside an accumulation: no optimizer step yet
            return
        self._last_step = trainer.global_step
        code = 0 if self._received is None else 2 if self._received == self._requeue_signal else 1
        if trainer.world_size > 1:  # every rank stops at the step where any rank was signalled
            code = int(trainer.strategy.reduce(torch.tensor(code, device=pl_module.device), reduce_op="max").item())
        if code:
            self.preempted_by = self._requeue_signal.name if code == 2 else "SIGTERM"
            trainer._signal_connector.received_sigterm = True  # the loop raises SIGTERMException after this batch

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        try:
            if not isinstance(exception, SIGTERMException):
                return
            if self.preempted_by is None:  # a SIGTERM Lightning's handler caught before training started
                exception.code = PREEMPTED_EXIT_CODE
                return
            self.checkpoint_path = self._last_checkpoint_path(trainer)
            trainer.save_checkpoint(self.checkpoint_path)
            log.warning(f"{self.preempted_by}: saved step {trainer.global_step} to {self.checkpoint_path}")
            exception.code = preempted_exit_code(self.preempted_by)
            if self.preempted_by != "SIGTERM" and trainer.is_global_zero and _slurm_requeues(trainer):
                requeue_slurm_job(slurm_job_id())
        finally:
            self._restore(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore(trainer)

    @staticmethod
    def _last_checkpoint_path(trainer: Trainer) -> str:
        checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        checkpoints.sort(key=lambda c: not c.save_last)  # stable: the first one with save_last, else the first
        if checkpoints:
            return os.path.join(checkpoints[0].dirpath, checkpoints[0].CHECKPOINT_NAME_LAST + checkpoints[0].FILE_EXTENSION)
        return str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")


def _slurm_requeues(trainer: Trainer) -> bool:
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue
