"""LeJEPA under DDP on 2 CPU processes (gloo, one launch): the loss on fixed embeddings, and the method trained
for 2 optimizer steps on fixed multi-crop views; ``tests/test_lejepa.py`` compares both with one process.

``python -m tests.ddp_lejepa OUT`` trains a tiny LeJEPA (ViT backbone, projector with BatchNorm) with
``Trainer(strategy="ddp", devices=2, accelerator="cpu")`` and saves each rank's ``state_dict`` as
``OUT/lejepa_rank<r>.pt``; then, in the same process group, each rank computes SIGReg and the LeJEPA loss on its
rows of ``loss_inputs()`` and the method's directions at two steps (``loss_checks``), saved by rank 0 as
``OUT/loss_checks.pt``. ``train_one_process`` is the reference of the training run: one process on the full
batch, each rank's BatchNorm groups simulated (``tests.ddp_methods.simulated_ranks``, which says why). What must
agree: SIGReg's characteristic function summed over both ranks with gradient, the directions drawn from the step
(the same on both ranks), the predictive loss averaged by DDP, the learning rate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from ssl_lightning.losses.sigreg import lejepa_loss, sigreg, slice_directions
from ssl_lightning.methods.lejepa import LeJEPA
from ssl_lightning.optim import OptimConfig
from tests.ddp_methods import GLOBAL_BATCH, IMAGE_SIZE, LOCAL_SIZE, NUM_LOCAL, SGD, STEPS, VIT, WORLD_SIZE, FixedViews
from tests.ddp_methods import simulated_ranks, state
from tests.wiring_utils import stub_trainer

LOSS_LAMBDA, LOSS_GLOBAL = 0.3, 2


def build() -> LeJEPA:
    """Tiny and seeded: the same weights in every process; lambda 0.5 so that SIGReg moves the weights."""
    seed_everything(0, verbose=False)
    return LeJEPA(**VIT, projection_hidden_dim=32, projection_dim=16, num_slices=16, sigreg_weight=0.5,
                  slice_seed=3, optim=OptimConfig(**SGD))


def fixed_views() -> list[list[torch.Tensor]]:
    """For each step, 2 global and ``NUM_LOCAL`` local views of the global batch."""
    generator = torch.Generator().manual_seed(2)
    sizes = [IMAGE_SIZE] * 2 + [LOCAL_SIZE] * NUM_LOCAL
    return [[torch.randn(GLOBAL_BATCH, 3, s, s, generator=generator) for s in sizes] for _ in range(STEPS)]


def train(devices: int) -> LeJEPA:
    model = build()
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=STEPS,
                      use_distributed_sampler=False, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, FixedViews(fixed_views(), devices))
    return model


def train_one_process() -> dict[str, torch.Tensor]:
    with simulated_ranks():
        return state(train(devices=1))


def loss_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (3 views, 8 images, 5 dimensions) of unequal spread, and 4 unit directions (float64)."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 8, 5, generator=g, dtype=torch.float64) * torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    return z, slice_directions(5, 4, g).double()


def loss_checks(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Each rank holds its rows of every view: the values of SIGReg and the LeJEPA loss on every rank, the
    embeddings' gradients gathered and averaged over ranks (as DDP averages), and the method's directions on every
    rank at steps 0 and 1 (step, rank, K, M)."""
    import torch.distributed as dist

    def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.zeros_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)

    z, directions = loss_inputs()
    results: dict[str, torch.Tensor] = {}
    for name in ("sigreg", "lejepa"):
        mine = z.chunk(world_size, dim=1)[rank].clone().requires_grad_()
        if name == "sigreg":
            value = sigreg(mine, directions)
        else:
            value = lejepa_loss(mine, LOSS_GLOBAL, directions, LOSS_LAMBDA).loss
        value.backward()
        results[f"{name}_values"] = gather(value.detach()[None], 0)
        results[f"{name}_grad"] = gather(mine.grad, 1) / world_size
    model = build()
    per_step = []
    for step in (0, 1):
        model._trainer = stub_trainer(global_step=step, global_rank=rank, world_size=world_size)
        per_step.append(gather(model.slice_directions(16, torch.device("cpu"))[None], 0))
    results["directions"] = torch.stack(per_step)
    return results


def main(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    model = train(devices=WORLD_SIZE)
    torch.save(state(model), out / f"lejepa_rank{dist.get_rank()}.pt")
    checks = loss_checks(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        torch.save(checks, out / "loss_checks.pt")
    dist.barrier()


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main(Path(sys.argv[1]))
