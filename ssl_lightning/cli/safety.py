"""What every ``fit`` gets whatever its config says: divergence stops the run, pre-emption saves it, and
checkpoints are written atomically. A config may set their options; it cannot leave them out."""

from __future__ import annotations

from jsonargparse import Namespace

from ssl_lightning.cli.run_folder import as_list, class_name

SAFETY_CALLBACKS = {
    "NonFiniteGuard": "ssl_lightning.callbacks.NonFiniteGuard",
    "PreemptionCheckpoint": "ssl_lightning.callbacks.PreemptionCheckpoint",
}
ATOMIC_IO = "ssl_lightning.checkpoint_io.AtomicCheckpointIO"


def add_safety(trainer: Namespace) -> None:
    """Append the safety callbacks a config lacks, and atomic checkpoint writes unless a CheckpointIO is set."""
    callbacks = as_list(trainer.get("callbacks"))
    present = {class_name(callback) for callback in callbacks}
    callbacks += [
        Namespace(class_path=path, init_args=Namespace()) for name, path in SAFETY_CALLBACKS.items() if name not in present
    ]
    trainer.callbacks = callbacks
    plugins = as_list(trainer.get("plugins"))
    if not any(class_name(plugin).endswith("CheckpointIO") for plugin in plugins):
        trainer.plugins = plugins + [Namespace(class_path=ATOMIC_IO, init_args=Namespace())]
