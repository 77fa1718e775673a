"""``SSLDataModule``: turns a source of images (and maybe labels) into batches of views.

A subclass names its sources (``train_source``, ``val_source`` and optionally ``bank_source``), each a
dataset of ``(uint8 CHW image tensor, label)`` with label -1 where there is none. The base class makes the
views, either per sample in DataLoader workers or batched on the device in ``on_after_batch_transfer``
(``views_on_device``), and provides the evaluation datasets used by the probe and the kNN monitor.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from ssl_lightning.datamodules.encoded import collate_encoded
from ssl_lightning.transforms import BatchedViews, SimCLRViews, eval_transform
from ssl_lightning.transforms.decoded_crops import random_resized_crops

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, 3, H, W) with int64 labels (-1: no label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"expected {images.shape[0]} labels, got shape {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


MakeView = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def seeded_views(
    image: torch.Tensor, make_views: Sequence[MakeView], seed: int, epoch: int, index: int
) -> dict[str, list[torch.Tensor]]:
    """``{"views", "boxes"}`` of one image, every random draw from the CPU generator seeded by (seed, epoch, index):
    the same views whichever worker or process makes them, so a resumed epoch remakes them. The generator's state
    is restored after."""
    with torch.random.fork_rng(devices=[]):
        # the CPU generator alone: ``torch.manual_seed`` also queues CUDA seeding, with a stack trace each call
        torch.default_generator.manual_seed(hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
        views, boxes = zip(*(make(image) for make in make_views))
    return {"views": list(views), "boxes": list(boxes)}


class ViewsDataset(Dataset):
    """``{"views", "boxes", "label", "index"}`` from a source of ``(image, label)``: one ``(view, box)``
    callable per view (``CroppedView``), so the local crops of multi-crop get their own size and scale.

    An item is asked for by ``(epoch, index)`` (``EpochKeySampler``; a bare index is epoch 0's) and its views are
    drawn by ``seeded_views`` from (seed, epoch, index), so a worker needs no word of the epoch (persistent ones
    keep their copy of the dataset from the first epoch).
    """

    def __init__(self, source: Dataset, make_views: Sequence[MakeView], seed: int = 0) -> None:
        self.source, self.make_views, self.seed = source, list(make_views), seed

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict[str, Any]:
        epoch, index = (0, key) if isinstance(key, int) else key
        image, label = self.source[index]
        return {**seeded_views(image, self.make_views, self.seed, epoch, index), "label": label, "index": index}


class TransformedImages(Dataset):
    """``{"image": transform(image), "label", "index"}`` from a source of ``(image, label)``."""

    def __init__(self, source: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.source[index]
        return {"image": self.transform(image), "label": label, "index": index}


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of a random order per epoch drawn from (seed, epoch) alone, and how far training got
    into it, so that a run resumed mid-epoch sees the same batches on every rank as an uninterrupted one.

    The order of epoch ``e`` is a permutation seeded by (seed, e), cut to a multiple of ``num_replicas``; rank
    ``r`` takes its items ``r, r + num_replicas, ...`` (the split of ``DistributedSampler(drop_last=True)``).
    ``advance(n)`` counts the items training has used in the epoch: the datamodule calls it per batch used,
    not per batch loaded, since loaders run ahead of training. ``state_dict`` is (epoch, items used) and an
    iterator started after ``load_state_dict`` skips the used items. Lightning calls ``set_epoch`` before each
    epoch, and keeps a ``DistributedSampler`` of the loader's own under DDP instead of injecting its own.
    """

    def __init__(self, num_items: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas or num_items < num_replicas:
            raise ValueError(f"EpochShuffleSampler: rank {rank} of {num_replicas} processes over {num_items} items")
        super().__init__(range(num_items), num_replicas=num_replicas, rank=rank, seed=seed, drop_last=True)
        self.num_items, self.used = num_items, 0

    @classmethod
    def of_rank(cls, trainer: Any, num_items: int, seed: int, position: Optional[dict[str, int]] = None) -> EpochShuffleSampler:
        """The sampler of ``trainer``'s rank (one process without a trainer), at ``position`` (a ``state_dict``)."""
        world_size, rank = (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)
        sampler = cls(num_items, seed, world_size, rank)
        if position is not None:
            sampler.load_state_dict(position)
        return sampler

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.used = epoch, 0

    def advance(self, items: int) -> None:
        self.used += items

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "used": self.used}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch, self.used = int(state_dict["epoch"]), int(state_dict["used"])
        if self.used >= self.num_samples:  # saved at the end of an epoch: the next one starts
            self.epoch, self.used = self.epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator)[: self.total_size]
        return iter(order[self.rank :: self.num_replicas][self.used :].tolist())

    def __len__(self) -> int:
        return self.num_samples


class EpochKeySampler(EpochShuffleSampler):
    """An ``EpochShuffleSampler`` yielding ``(epoch, index)`` keys (``ViewsDataset``'s) instead of bare indices."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        return ((self.epoch, index) for index in super().__iter__())


class ResumableLoader(DataLoader):
    """A training loader over an ``EpochShuffleSampler`` whose position in the epoch is saved in checkpoints.

    Lightning saves the ``state_dict`` of a stateful training loader and does not warn that a mid-epoch resume
    is inexact. It loads that state only when it builds the loader after restoring the loops, which it does not
    when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``: the datamodules therefore also
    keep the position in their own state, restored before the loader is built.
    """

    sampler: EpochShuffleSampler

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.load_state_dict(state_dict)


def _unchanged(image: torch.Tensor) -> torch.Tensor:
    return image


def _size_or_none(name: str, value: Union[int, str]) -> Optional[int]:
    """A positive size in pixels, or None for ``"none"``."""
    if value == "none":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive number of pixels or 'none', got {value!r}")
    return value


class SSLDataModule(LightningDataModule):
    """Base of every image datamodule.

    Args:
        batch_size: per-process batch size.
        num_workers: DataLoader worker processes.
        views: the view recipe (global views, plus local crops when ``num_local`` > 0); its ``mean``/``std``
            are replaced by the dataset's.
        views_on_device: make the views batched on the device (per-sample parameters) instead of in workers.
        eval_batch_size: batch size of the evaluation loaders.
        seed: seed of the training order, of the device-side view generator (combined with the rank and the batch
            count) and of the views made in workers (combined with the epoch and the image's index).
        eval_resize: the shorter side (px) evaluation images are resized to before the centre crop; ``"none"``
            keeps their size. Default: the crop for fixed-size data (a no-op at that size), crop / 0.875 for
            images of any size (ImageNet's 256 -> 224), and no resize when ``eval_crop`` is ``"none"``.
        eval_crop: the centre crop (px) of evaluation images; ``"none"``: the whole image (images must then
            share one size). Default: ``views.size``. ``eval_resize: none`` with images of ``views.size`` px
            (or ``eval_crop: none``) gives the model the files' pixels, only scaled and normalized.

        compile_views: run the device views' elementwise stages (colour jitter, grayscale, solarization,
            normalization) through ``torch.compile``: one compilation per batch shape at the start (tens of
            seconds on a CPU), then several times faster views (``benchmarks/views_throughput.py``).

    The data's ``mean``/``std`` are saved in checkpoints (``datamodule_hyper_parameters``), so that
    ``ssl-lightning eval`` normalizes as in training whatever datamodule it evaluates on.
    """

    #: all images of a source share one size, so the device path can also do the random crops
    fixed_size: bool = True
    default_image_size: int = 32
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    num_classes: Optional[int] = None
    #: class names in label order, where the data has them (plots use them)
    classes: Optional[tuple[str, ...]] = None

    def __init__(
        self,
        batch_size: int = 256,
        num_workers: int = 4,
        views: Optional[SimCLRViews] = None,
        views_on_device: bool = True,
        eval_batch_size: int = 512,
        seed: Optional[int] = None,
        eval_resize: Union[int, Literal["none"], None] = None,
        eval_crop: Union[int, Literal["none"], None] = None,
        compile_views: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size and eval_batch_size must be positive, got {batch_size} and {eval_batch_size}")
        self.batch_size, self.num_workers, self.eval_batch_size = batch_size, num_workers, eval_batch_size
        recipe = views if views is not None else SimCLRViews(size=self.default_image_size)
        self.views = dataclasses.replace(recipe, mean=self.mean, std=self.std)
        self.views_on_device = views_on_device
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self.image_size = self.views.size
        self.eval_crop = self.image_size if eval_crop is None else _size_or_none("eval_crop", eval_crop)
        default_resize = self.eval_crop if self.fixed_size else round(self.eval_crop / 0.875) if self.eval_crop else None
        self.eval_resize = default_resize if eval_resize is None else _size_or_none("eval_resize", eval_resize)
        self.save_hyperparameters({"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]},
                                  logger=False)
        self._batched_views = self.views.batched(compile_views)
        self._batched_local = self.views.local_views().batched(compile_views) if self.views.num_local else None
        self._generator: Optional[torch.Generator] = None
        self._device_batches = 0  # view batches made on the device so far (saved for exact resume)
        self._train_loader: Optional[ResumableLoader] = None
        self._position: Optional[dict[str, int]] = None  # where a resumed run starts in the training order
        self._train: Optional[Dataset] = None
        self._val: Optional[Dataset] = None
        self._bank: Optional[Dataset] = None

    # ---- what a subclass provides -------------------------------------------------------------
    def train_source(self) -> Dataset:
        """Dataset of ``(uint8 CHW image, label)`` used for pretraining."""
        raise NotImplementedError

    def val_source(self) -> Optional[Dataset]:
        """Labeled dataset for evaluation, or None when the data has no labels."""
        return None

    def encoded_train_source(self) -> Optional[Dataset]:
        """With ``views_on_device``: training items ``{"data", "label", "index"}`` whose ``data`` (a file's bytes,
        see ``datamodules.encoded``) ``decode_images`` decodes on the device; None (default): decoded in workers."""
        return None

    def decode_images(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The uint8 (3, H, W) images of a batch of ``encoded_train_source`` items, on the batch's device."""
        raise NotImplementedError

    def bank_source(self) -> Optional[Dataset]:
        """Labeled training images for the kNN bank (defaults to the training source if labeled)."""
        return self._train if self.num_classes is not None else None

    @property
    def num_train_items(self) -> int:
        """The number of training images (dataset indices in training batches are below it); after ``setup``."""
        if self._train is None:
            raise RuntimeError(f"{type(self).__name__}.num_train_items is known after setup()")
        return len(self._train)  # type: ignore[arg-type]

    # ---- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._train is None:
            self._train = self.train_source()
            self._val = self.val_source()
            self._bank = self.bank_source()
            if len(self._train) == 0:  # type: ignore[arg-type]
                raise ValueError(f"{type(self).__name__}: the training set is empty")

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None, "call setup() first"
        encoded = self.encoded_train_source() if self.views_on_device else None
        if encoded is not None:  # file bytes: decoded, cropped and made into views on the device
            dataset: Dataset = encoded
        elif self.views_on_device and self.fixed_size:  # whole uint8 images; every view op on the device
            dataset = TransformedImages(self._train, _unchanged)
        elif self.views_on_device:  # variable sizes: crops in workers, the rest on the device
            dataset = ViewsDataset(self._train, self.views.worker_crops(), self.seed)
        else:
            dataset = ViewsDataset(self._train, self.views.per_sample_views(), self.seed)
        position, self._position = self._position, None
        keyed = isinstance(dataset, ViewsDataset)  # views drawn per (seed, epoch, index) need the epoch
        sampler = (EpochKeySampler if keyed else EpochShuffleSampler).of_rank(
            self.trainer, len(dataset), self.seed, position)  # type: ignore[arg-type]
        self._train_loader = self._loader(dataset, self.batch_size, shuffle=False, drop_last=True, sampler=sampler,
                                          collate_fn=None if encoded is None else collate_encoded)
        return self._train_loader

    def val_dataloader(self) -> Any:
        ds = self.val_dataset()
        return [] if ds is None else self._loader(ds, self.eval_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> Any:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The evaluation images (or, without labels, the training images) with the evaluation transform."""
        ds = self.val_dataset()
        return self._loader(ds or self.train_images(), self.eval_batch_size, shuffle=False, drop_last=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is None or not self.trainer.training:
            return batch
        if self._train_loader is not None:
            self._train_loader.sampler.advance(batch["label"].shape[0])
        return self._device_views(batch) if self.views_on_device else batch

    def state_dict(self) -> dict[str, Any]:
        """The device-view generator's batch count and the position in the training order."""
        position = self._position if self._train_loader is None else self._train_loader.state_dict()
        return {"device_batches": self._device_batches, "position": position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._device_batches = int(state_dict["device_batches"])
        self._position = state_dict.get("position")

    # ---- evaluation datasets (contract used by the probe and the kNN monitor) -----------------
    def val_dataset(self) -> Optional[Dataset]:
        return None if self._val is None else TransformedImages(self._val, self._eval_fn())

    def train_images(self) -> Dataset:
        """Every training image with the evaluation transform, ``{"image", "label", "index"}`` in training-set
        order (DeepCluster-v2's first memory bank); unlike ``train_eval_dataset`` it exists without labels."""
        if self._train is None:
            raise RuntimeError(f"{type(self).__name__}.train_images() needs setup() first")
        return TransformedImages(self._train, self._eval_fn())

    def train_eval_dataset(self) -> Optional[Dataset]:
        return None if self._bank is None else TransformedImages(self._bank, self._eval_fn())

    def labeled_sources(self) -> tuple[Optional[Dataset], Optional[Dataset]]:
        """The labeled training images (the kNN bank's source) and the validation images, as datasets of
        ``(uint8 CHW image, label)`` without any transform (fine-tuning, label fractions); None where absent."""
        if self._train is None:
            self.setup("fit")
        return self._bank, self._val

    def eval_loader(self, dataset: Dataset, rank: int = 0, world_size: int = 1) -> DataLoader:
        shard = Subset(dataset, range(rank, len(dataset), world_size))  # type: ignore[arg-type]
        return self._loader(shard, self.eval_batch_size, shuffle=False, drop_last=False)

    # ---- internals -----------------------------------------------------------------------------
    def _eval_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return eval_transform(self.eval_crop, self.mean, self.std, resize=self.eval_resize)

    def _device_views(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The views of a batch and their boxes, global views first; each size is made as one batched call.

        Parameters are drawn per sample and per view from the step's generator, in view order.
        """
        generator = self._step_generator(batch["label"].device)
        if "data" in batch:  # encoded files: decoded here, then cropped here too
            batch = {**batch, "images": self.decode_images(batch)}
        groups: list[tuple[BatchedViews, int]] = [(self._batched_views, self.views.num_views)]
        if self._batched_local is not None:
            groups.append((self._batched_local, self.views.num_local))
        views: list[torch.Tensor] = []
        boxes: list[torch.Tensor] = []
        for make, count in groups:
            if "image" in batch:  # whole images: crop on the device too
                made, places = make.with_boxes(batch["image"].repeat(count, 1, 1, 1), generator, True, count)
            elif "images" in batch:  # decoded images of different sizes: crops, then the rest of the recipe
                r = make.recipe
                crops, places = random_resized_crops(batch["images"], generator, r.size, r.scale, r.ratio, count)
                made, flips = make.with_boxes(crops, generator, False, count)
                places = torch.cat([places, flips[:, 4:]], 1)
            else:  # crops made in workers (their boxes too): the rest of the recipe on the device (the flips)
                crops = torch.cat(batch["views"][len(views) : len(views) + count])
                made, flips = make.with_boxes(crops, generator, False, count)
                places = torch.cat([torch.cat(batch["boxes"][len(views) : len(views) + count])[:, :4], flips[:, 4:]], 1)
            views += made.chunk(count)
            boxes += places.chunk(count)
        rest = {key: value for key, value in batch.items() if key not in ("image", "views", "boxes", "data", "images")}
        return {"views": views, "boxes": boxes, **rest}  # label, index

    def _step_generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded from (seed, rank, batch count): distinct per rank, reproducible on resume."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self._generator.manual_seed(hash((self.seed, rank, self._device_batches)) & 0x7FFF_FFFF_FFFF_FFFF)
        self._device_batches += 1
        return self._generator

    def _loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, sampler: Optional[Sampler] = None,
        collate_fn: Optional[Callable[[list[Any]], Any]] = None,
    ) -> DataLoader:
        if drop_last and len(dataset) < batch_size:  # type: ignore[arg-type]
            raise ValueError(
                f"{type(self).__name__}: batch_size={batch_size} is larger than the {len(dataset)} training images"  # type: ignore[arg-type]
            )
        return (ResumableLoader if isinstance(sampler, EpochShuffleSampler) else DataLoader)(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
