"""DeepCluster-v2 under Lightning DDP on 2 CPU processes (gloo): ``python -m tests.ddp_deepcluster_v2 OUT`` trains a
tiny model for 2 epochs on synthetic images and saves each rank's first memory bank (the pass before the first
step), its bank, assignment table and prototypes at the end as ``OUT/rank<r>.pt``; ``first_bank_one_process``
is the same first bank on one process. ``tests/test_deepcluster_v2.py`` compares them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.methods import DeepClusterV2
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews

ARGS: dict[str, Any] = {"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}, "projection_hidden_dim": 16,
                        "projection_dim": 8, "num_prototypes": [3, 5], "kmeans_iterations": 3}


class RecordingDeepClusterV2(DeepClusterV2):
    """Keeps a copy of the bank each time it is clustered, and what DDP does not broadcast."""

    def cluster_memory_bank(self) -> None:
        self.banks_clustered = [*getattr(self, "banks_clustered", []), self.memory_bank.clone()]
        self.not_broadcast = sorted(getattr(self.trainer.strategy.model, "parameters_to_ignore", []))
        super().cluster_memory_bank()


def fit(devices: int, max_epochs: int, limit_train_batches: int | None = None) -> RecordingDeepClusterV2:
    seed_everything(0, verbose=False)
    model = RecordingDeepClusterV2(**ARGS, optim=OptimConfig(name="sgd", lr=0.1, warmup_epochs=0))
    data = SyntheticData(num_samples=24, batch_size=4, image_size=16, num_workers=0, seed=0,
                         views=SimCLRViews(16, num_local=1, local_size=8))
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                      max_epochs=max_epochs, limit_train_batches=limit_train_batches, limit_val_batches=0,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(model, data)
    return model


def first_bank_one_process() -> torch.Tensor:
    return fit(devices=1, max_epochs=1, limit_train_batches=1).banks_clustered[0]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    model = fit(devices=2, max_epochs=2)
    saved = {"banks_clustered": model.banks_clustered, "memory_bank": model.memory_bank,
             "assignments": model.assignments, "prototypes": [head.weight.detach() for head in model.prototypes],
             "not_broadcast": model.not_broadcast}
    torch.save(saved, out / f"rank{model.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
