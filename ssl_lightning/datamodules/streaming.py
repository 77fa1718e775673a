"""``StreamingImages``: images prepared as LitData chunks (``ssl-lightning prepare``), streamed from a local folder
or an object store (``s3://``, ``gs://``, ...) by LitData's ``StreamingDataset`` / ``StreamingDataLoader``.

LitData deals each rank, and each worker of a rank, chunks in an order drawn from (seed, epoch), so memory stays
flat as the dataset grows (a worker holds a few chunks, never a list of files). Exact mid-epoch resume is LitData's
own: the loader's ``state_dict`` counts the batches it yielded (Lightning fetches none ahead from a loader with a
length) and ``load_state_dict`` replays each worker's share. Two things are added on top:

- Lightning does not call ``load_state_dict`` when ``configure_optimizers`` built the loader before the checkpoint's
  loops were restored (``estimated_stepping_batches``: the resumed epoch would start over), so, as for the other
  datamodules, the datamodule keeps the loader's state in its own and hands it to the loader it builds;
- ``StreamingLoader`` resumes only the pass after ``load_state_dict`` (LitData would replay it again next epoch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
from litdata import StreamingDataLoader, StreamingDataset
from torch.utils.data import Dataset

from ssl_lightning.datamodules.base import IMAGENET_MEAN, IMAGENET_STD, MakeView, SSLDataModule, seeded_views
from ssl_lightning.datamodules.encoded import decode_rgb
from ssl_lightning.datamodules.prepared import read_prepared


class PreparedImages(Dataset):
    """``(uint8 image, label)`` by position in a prepared folder or URL (random access: the kNN bank, evaluation)."""

    def __init__(self, location: str, num_items: int, cache_dir: Optional[str] = None) -> None:
        self.location, self.num_items, self.cache_dir = location, num_items, cache_dir
        self._dataset: Optional[StreamingDataset] = None  # opened by the process that reads (a forked worker too)
        self._opened_by = 0

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._dataset is None or self._opened_by != os.getpid():
            self._dataset, self._opened_by = StreamingDataset(self.location, cache_dir=self.cache_dir), os.getpid()
        item = self._dataset[index]
        return decode_rgb(bytes(item["image"]), f"{self.location} item {index}"), int(item["label"])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}


class ViewStream(StreamingDataset):
    """LitData's stream of a prepared folder, each item made into ``{"views", "boxes", "label", "index"}`` in the
    worker that reads it, its views drawn by ``seeded_views`` from (seed, epoch, index) as on the other datamodules'
    worker path, so a resumed epoch makes the same views."""

    def __init__(self, location: str, make_views: Sequence[MakeView], **kwargs: Any) -> None:
        super().__init__(location, **kwargs)
        self.location, self.make_views = location, list(make_views)

    def __next__(self) -> dict[str, Any]:
        item = super().__next__()
        index = int(item["index"])
        image = decode_rgb(bytes(item["image"]), f"{self.location} item {index}")
        views = seeded_views(image, self.make_views, self.seed, self.current_epoch, index)
        return {**views, "label": int(item["label"]), "index": index}


class StreamingLoader(StreamingDataLoader):
    """LitData's loader, resuming only the first pass after ``load_state_dict``.

    LitData clears its resume flag only when a pass runs to its end; Lightning ends an epoch at the loader's length
    without asking for more, so the next epoch would replay the resumed one from the loaded position.
    """

    def __init__(self, dataset: ViewStream, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._resume_next_pass = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._resume_next_pass = self.restore

    def __iter__(self) -> Any:
        self.restore, self._resume_next_pass = self._resume_next_pass, False
        return super().__iter__()


def in_this_cache(position: dict[str, Any], dataset: StreamingDataset) -> dict[str, Any]:
    """A loader ``position`` from a URL with LitData's cache folder of ``dataset``, this run's: where the chunks are
    cached is this machine's choice (a requeued job may get another node-local scratch folder), not part of where the
    epoch stands, and LitData refuses a position whose cache folder moved. It still checks the URL, seed, shuffle,
    ranks and workers."""
    state = position["dataset"]
    if dataset.input_dir.url is None or state.get("input_dir_url") != dataset.input_dir.url:
        return position
    moved = {"input_dir_path": dataset.input_dir.path, "cache_dir_path": dataset.cache_dir.path}
    return {**position, "dataset": {**state, **moved}}


class StreamingImages(SSLDataModule):
    """Images of any size from ``ssl-lightning prepare`` output; random crops in workers, the rest where chosen.

    Args:
        input_dir: the prepared training images: a local folder or a URL (``s3://bucket/train``; credentials from
            the usual environment variables, e.g. ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``).
        val_dir: the prepared validation images (same classes), or None: no validation set. The kNN bank is the
            training images (when labeled), read by position.
        cache_dir: where LitData keeps chunks fetched from a URL (default: its own cache folder).
        max_cache_size: the most disk the chunk cache of a URL may take (LitData's size string, e.g. ``"200GB"``;
            default: LitData's, 75% of the free disk).
    """

    fixed_size = False
    default_image_size = 224
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        input_dir: str,
        val_dir: Optional[str] = None,
        cache_dir: Optional[str] = None,
        max_cache_size: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        self.input_dir, self.val_dir = input_dir, val_dir
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        metadata = read_prepared(input_dir, cache_dir)
        self.num_train, self.classes = metadata["num_items"], tuple(metadata["classes"])
        self.num_classes = len(self.classes) or None
        self.num_val: Optional[int] = None
        if val_dir is not None:
            val = read_prepared(val_dir, cache_dir)
            if tuple(val["classes"]) != self.classes:
                raise ValueError(f"{val_dir}: classes {val['classes'][:5]}... differ from {input_dir}'s")
            self.num_val = val["num_items"]
        self._stream: Optional[StreamingLoader] = None
        super().__init__(**kwargs)

    def train_source(self) -> Dataset:
        return PreparedImages(self.input_dir, self.num_train, self.cache_dir)

    def val_source(self) -> Optional[Dataset]:
        if self.val_dir is None or self.num_classes is None:
            return None
        return PreparedImages(self.val_dir, self.num_val, self.cache_dir)  # type: ignore[arg-type]

    def train_dataloader(self) -> StreamingLoader:
        make = self.views.worker_crops() if self.views_on_device else self.views.per_sample_views()
        dataset = ViewStream(self.input_dir, make, cache_dir=self.cache_dir, shuffle=True, drop_last=True,
                             seed=self.seed, max_cache_size=self.max_cache_size, item_shuffle_window="full")
        self._stream = StreamingLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                       drop_last=True, pin_memory=torch.cuda.is_available())
        if len(self._stream) == 0:
            raise ValueError(f"{self.input_dir}: {self.num_train} images make no batch of {self.batch_size} a process")
        position, self._position = self._position, None
        if position is not None:
            self._stream.load_state_dict(in_this_cache(position, dataset))
        return self._stream

    def state_dict(self) -> dict[str, Any]:
        """The base's state, with the training loader's (LitData's) state as the position."""
        state = super().state_dict()
        if self._stream is not None:
            state["position"] = self._stream.state_dict()
        return state
