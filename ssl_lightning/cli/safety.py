"""What every ``fit`` gets whatever its config says: periodic and pre-emption checkpoints, a divergence
guard, atomic checkpoint writes. ``configs/base.yaml``'s ``safety:`` section (or ``--safety.*``) sets them;
a config cannot leave them out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jsonargparse import Namespace

from ssl_lightning.cli.run_folder import as_list, class_name

ATOMIC_IO = "ssl_lightning.checkpoint_io.AtomicCheckpointIO"


@dataclass
class SafetySettings:
    """``checkpoint_every_n_train_steps`` / ``checkpoint_every_n_minutes``: rewrite ``last.ckpt`` every N
    optimizer steps or M minutes of wall time, whichever comes first (None: that trigger off; ``last.ckpt`` is
    also written at each epoch end and on SIGTERM/SIGUSR1). ``skip_nonfinite``: skip a step with a non-finite
    loss or gradient (counted, at most ``max_skipped`` in a row) instead of stopping the run."""

    checkpoint_every_n_train_steps: Optional[int] = None
    checkpoint_every_n_minutes: Optional[float] = 30.0
    skip_nonfinite: bool = False
    max_skipped: int = 10


def add_safety(trainer: Namespace, settings: Namespace, checkpoints_dir: str) -> None:
    """Append the safety callbacks (configured from ``settings``) and atomic checkpoint writes (unless a
    CheckpointIO is set) to the trainer's config, in place."""
    callbacks = [c for c in as_list(trainer.get("callbacks")) if class_name(c) not in ("NonFiniteGuard", "PeriodicCheckpoint")]
    every_n_steps, every_n_minutes = settings.checkpoint_every_n_train_steps, settings.checkpoint_every_n_minutes
    callbacks.append(Namespace(class_path="ssl_lightning.callbacks.NonFiniteGuard", init_args=Namespace(
        skip_nonfinite=settings.skip_nonfinite, max_skipped=settings.max_skipped)))
    if "PreemptionCheckpoint" not in {class_name(c) for c in callbacks}:
        callbacks.append(Namespace(class_path="ssl_lightning.callbacks.PreemptionCheckpoint", init_args=Namespace()))
    if trainer.get("enable_checkpointing") is not False:
        callbacks.append(Namespace(class_path="ssl_lightning.callbacks.PeriodicCheckpoint", init_args=Namespace(
            every_n_train_steps=every_n_steps, every_n_minutes=every_n_minutes, dirpath=checkpoints_dir)))
    trainer.callbacks = callbacks
    plugins = as_list(trainer.get("plugins"))
    if not any(class_name(plugin).endswith("CheckpointIO") for plugin in plugins):
        trainer.plugins = plugins + [Namespace(class_path=ATOMIC_IO, init_args=Namespace())]
