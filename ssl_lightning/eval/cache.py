"""Features of a split extracted once and kept on disk.

A cache entry is keyed by the SHA-256 of the checkpoint file's *contents* (a re-saved or copied checkpoint
with the same bytes hits; a checkpoint overwritten in place by a longer run misses, whatever its mtime),
the datamodule's configuration (every init argument, the resolved seed and the split's size) and the
split's name. The images themselves are not hashed: after changing files on disk under the same config,
use another ``cache_dir`` or delete the entry. Entries hold only tensors and strings and are read back
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

FORMAT_VERSION = 1  # bump when what an entry holds changes
Features = tuple[torch.Tensor, torch.Tensor]


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's contents, read ``chunk_bytes`` at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def feature_cache_key(checkpoint_sha256: str, data_config: Mapping[str, Any], split: str) -> str:
    """A short hex key from the checkpoint's digest, the datamodule's config (JSON, keys sorted) and the split."""
    material = {"version": FORMAT_VERSION, "checkpoint": checkpoint_sha256, "data": data_config, "split": split}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


class FeatureCache:
    """``features-<key>.pt`` files under ``directory``, each ``{"features", "labels", "description"}``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"features-{key}.pt"

    def get(self, key: str, compute: Callable[[], Features], description: str = "") -> tuple[Features, bool]:
        """``((features, labels), hit)``: the stored entry on CPU, or ``compute()`` stored first.

        An unreadable entry is recomputed and replaced with a warning. Writes go to a temporary file that
        is renamed into place, so an interrupted run never leaves a truncated entry.
        """
        path = self.path(key)
        if path.is_file():
            try:
                entry = torch.load(path, map_location="cpu", weights_only=True)
                return (entry["features"], entry["labels"]), True
            except Exception as err:  # a damaged entry is only a cache miss
                warnings.warn(f"feature cache entry {path} is unreadable ({err}); extracting the features again")
        features, labels = compute()
        features, labels = features.detach().cpu(), labels.detach().cpu()
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"features": features, "labels": labels, "description": description}, partial)
        os.replace(partial, path)
        return (features, labels), False
