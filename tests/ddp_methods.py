"""Three methods trained for 2 optimizer steps on fixed views, under Lightning DDP and on one process.

``python -m tests.ddp_methods OUT`` trains SimCLR, MoCo v2 (shuffle-BN) and DINO (multi-crop) one after the other
with ``Trainer(strategy="ddp", devices=2, accelerator="cpu")`` (gloo; one launch for the three, DDP start-up
costs 10-30 s) and saves each rank's ``state_dict`` as ``OUT/<method>_rank<r>.pt``. ``train_one_process``
trains the same model on one process on the full batch, the reference of ``tests/test_methods_ddp.py``.

The views are identical in both runs: fixed tensors (``fixed_views``), no augmentation; rank ``r`` of ``W`` takes
rows ``r*B/W .. (r+1)*B/W`` of each global batch of ``B`` (``FixedViews``). The per-device batch is ``B/W``,
so the learning rate, scaled by per-device batch x world size, is the same.

BatchNorm: under DDP (no SyncBatchNorm: it does not run on CPU) each rank normalizes with its own half of the
batch, by design, and DDP broadcasts rank 0's buffers at every forward, so the running statistics that survive
are rank 0's. One BatchNorm over the full batch cannot match that, so the one-process reference of a method
with BatchNorm runs under ``simulated_ranks``: every BatchNorm normalizes each rank's rows on their own (and
keeps rank 0's running statistics), and MoCo's shuffle-BN permutes the full batch with the permutation the
ranks share, so each rank's slice of keys is normalized together and every key goes back to its own sample
(what shuffle-BN promises, He et al. 2020 sec. 3.3). The rest (gathers, queue, center, EMA, learning rate,
clipping) is the methods' own one-process code. DINO here has no BatchNorm (ViT, head without BN): its
reference is the plain one-process run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader

from ssl_lightning.methods import DINO, MoCoV2, SimCLR, SSLMethod
from ssl_lightning.methods import moco_v2
from ssl_lightning.optim import OptimConfig

METHODS = ("simclr", "moco_v2", "dino")
WORLD_SIZE = 2
GLOBAL_BATCH = 8
STEPS = 2
IMAGE_SIZE, LOCAL_SIZE, NUM_LOCAL = 16, 8, 2
# SGD: a step linear in the gradient (Adam's first step, g / (|g| + eps), would blow float noise up to lr);
# a large learning rate, so that a wrong gradient moves the weights far beyond the comparison's tolerance
SGD = {"name": "sgd", "lr": 12.8, "weight_decay": 1e-4, "warmup_epochs": 1}  # 0.4 at batch 8, warm-up over 2 steps
# contiguous, not channels-last: ``simulated_ranks``' BatchNorm returns contiguous tensors, so the reference would run
# the next convolutions in the other memory format; in float32 that rounding alone, grown by two steps at lr 0.4 over
# BatchNorms of 4 images, moved conv1 by 3e-3 on one CPU (in float64 the two formats agree to 1e-14)
RESNET = {"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}, "channels_last": False}
VIT = {"backbone": "vit_tiny", "backbone_kwargs": {"image_size": IMAGE_SIZE, "patch_size": 8, "embed_dim": 32,
                                                   "depth": 1, "num_heads": 2}}


def build(name: str) -> SSLMethod:
    """The method ``name`` with tiny networks, seeded: the same weights in every process."""
    seed_everything(0, verbose=False)
    if name == "simclr":
        return SimCLR(**RESNET, projection_hidden_dim=32, projection_dim=16, optim=OptimConfig(**SGD))
    if name == "moco_v2":
        return MoCoV2(**RESNET, projection_hidden_dim=32, projection_dim=16, queue_size=24, momentum=0.9,
                      shuffle_bn=True, optim=OptimConfig(**SGD))
    if name == "dino":  # clip_grad 0.5 so that the per-parameter clipping acts; the last layer trains at once
        return DINO(**VIT, out_dim=32, hidden_dim=32, bottleneck_dim=16, base_momentum=0.9, clip_grad=0.5,
                    freeze_last_layer_epochs=0, warmup_teacher_temperature=0.04, optim=OptimConfig(**SGD))
    raise ValueError(f"unknown method {name!r}; one of {METHODS}")


def fixed_views(name: str) -> list[list[torch.Tensor]]:
    """For each step, the views of the global batch (2 views; DINO: 2 global crops and 2 local ones)."""
    generator = torch.Generator().manual_seed(1)
    sizes = [IMAGE_SIZE] * 2 + ([LOCAL_SIZE] * NUM_LOCAL if name == "dino" else [])
    return [[torch.randn(GLOBAL_BATCH, 3, s, s, generator=generator) for s in sizes] for _ in range(STEPS)]


class FixedViews(LightningDataModule):
    """Precomputed view batches, no augmentation: rank ``r`` of ``W`` gets rows ``r*B/W .. (r+1)*B/W`` of each."""

    def __init__(self, steps: list[list[torch.Tensor]], world_size: int) -> None:
        super().__init__()
        self.steps, self.world_size = steps, world_size
        self.batch_size = GLOBAL_BATCH // world_size  # per device: the learning rate scales with it x world size

    def train_dataloader(self) -> DataLoader:
        rows = slice(self.trainer.global_rank * self.batch_size, (self.trainer.global_rank + 1) * self.batch_size)
        batches = [{"views": [view[rows] for view in views], "label": torch.full((self.batch_size,), -1)}
                   for views in self.steps]
        return DataLoader(batches, batch_size=None)


def train(name: str, devices: int) -> SSLMethod:
    """``STEPS`` optimizer steps of ``name`` on ``devices`` CPU processes (DDP when 2) over ``fixed_views``."""
    model = build(name)
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=STEPS,
        use_distributed_sampler=False,  # FixedViews gives each rank its rows
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, FixedViews(fixed_views(name), devices))
    return model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@contextmanager
def simulated_ranks(world_size: int = WORLD_SIZE, batch: int = GLOBAL_BATCH) -> Iterator[None]:
    """One process computes what ``world_size`` DDP ranks without SyncBatchNorm compute together.

    Every BatchNorm in training mode normalizes each rank's rows on their own: an input of ``V * batch`` rows
    (``V`` views concatenated, each in global-batch order) is split into ``V x world_size`` blocks and rank
    ``r``'s rows are block ``r`` of every view; the running statistics keep rank 0's update only (DDP
    broadcasts rank 0's buffers). MoCo v2's shuffle-BN draws the permutation of the global batch as the ranks
    do (from the same generator) and encodes the permuted batch, so that rank ``r``'s keys are normalized
    with the permutation's ``r``-th slice; the keys are then put back in the order of their samples.
    """
    batchnorm = nn.modules.batchnorm._BatchNorm
    original: Callable[..., torch.Tensor] = batchnorm.forward

    def per_rank_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return original(self, x)
        if x.shape[0] % batch:
            raise ValueError(f"simulated_ranks: {x.shape[0]} rows are not whole views of the global batch {batch}")
        blocks = x.unflatten(0, (x.shape[0] // batch, world_size, batch // world_size))
        own = dict(self.named_buffers(recurse=False))
        outputs = []
        for r in range(world_size):  # ranks > 0 update throwaway copies: rank 0's running statistics are kept
            for key, buffer in own.items():
                setattr(self, key, buffer if r == 0 else buffer.clone())
            outputs.append(original(self, blocks[:, r].flatten(0, 1)).unflatten(0, (blocks.shape[0], -1)))
        for key, buffer in own.items():
            setattr(self, key, buffer)
        return torch.stack(outputs, dim=1).flatten(0, 2)

    def shuffle(tensor: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        permutation = torch.randperm(tensor.shape[0], generator=generator, device=generator.device)
        return tensor[permutation], torch.argsort(permutation)

    def unshuffle(tensor: torch.Tensor, order: Any) -> torch.Tensor:
        return tensor[order]

    saved = moco_v2.shuffle_across_ranks, moco_v2.unshuffle_across_ranks
    batchnorm.forward = per_rank_forward  # type: ignore[method-assign]
    moco_v2.shuffle_across_ranks, moco_v2.unshuffle_across_ranks = shuffle, unshuffle  # type: ignore[assignment]
    try:
        yield
    finally:
        batchnorm.forward = original  # type: ignore[method-assign]
        moco_v2.shuffle_across_ranks, moco_v2.unshuffle_across_ranks = saved


def train_one_process(name: str) -> dict[str, torch.Tensor]:
    """The reference: ``name`` trained on one process on the full batches, ranks' BatchNorm groups simulated."""
    with simulated_ranks():
        return state(train(name, devices=1))


def main(out: Path) -> None:
    """Each method under DDP on ``WORLD_SIZE`` processes; every rank saves its state."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    for name in METHODS:
        model = train(name, devices=WORLD_SIZE)
        torch.save(state(model), out / f"{name}_rank{dist.get_rank()}.pt")
    dist.barrier()  # rank 0 (the launched process) exits after every rank saved


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main(Path(sys.argv[1]))
