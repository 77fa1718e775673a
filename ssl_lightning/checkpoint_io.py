"""``AtomicCheckpointIO``: a checkpoint file is either the old one or the complete new one, never half written.

Lightning's ``TorchCheckpointIO`` serializes into memory and writes through an fsspec transaction whose
temporary file lives in the system temp folder: when that is another filesystem (node-local ``/tmp``,
checkpoints on a shared one) the final move is a copy, and a job killed during it leaves a truncated
``last.ckpt``. Here the temporary file sits next to the target, is fsynced, and ``os.replace`` (atomic
on POSIX within one filesystem) puts it in place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves write a temporary file in the target's folder, fsync it and
    rename it onto the target. An exception during the write removes the temporary file; a kill leaves
    it behind (``.<name>.<pid>.tmp``) and the previous checkpoint intact. Remote paths (``s3://`` ...)
    keep Lightning's own transaction.

    Use: ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        filesystem, local_path = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(filesystem, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_folder(target.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
