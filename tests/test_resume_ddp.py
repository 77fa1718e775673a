"""Mid-epoch resume under DDP: the training sampler splits the (seed, epoch) order across ranks itself and saves
how far the epoch got, so a run resumed from a mid-epoch checkpoint on 2 processes ends bit-identical to an
uninterrupted one, and Lightning neither injects its own DistributedSampler nor warns the loader is not resumable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.types import _Stateful
from torch.utils.data import DistributedSampler

from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.datamodules.base import EpochShuffleSampler
from tests.test_resume_every_method import assert_same


def test_ranks_split_one_epoch_order_without_overlap_as_distributed_sampler_with_drop_last() -> None:
    for num_items, world_size in [(35, 2), (34, 2), (10, 3)]:
        shards = [list(EpochShuffleSampler(num_items, seed=3, num_replicas=world_size, rank=r)) for r in range(world_size)]
        reference = DistributedSampler(range(num_items), num_replicas=world_size, rank=0, drop_last=True)
        assert [len(s) for s in shards] == [len(reference)] * world_size == [num_items // world_size] * world_size
        seen = [i for shard in shards for i in shard]
        assert len(set(seen)) == len(seen) and set(seen) <= set(range(num_items))
        one_process = list(EpochShuffleSampler(num_items, seed=3))  # the same order, dealt out in turn
        for r, shard in enumerate(shards):
            assert shard == one_process[: len(seen)][r::world_size]


def test_order_depends_on_seed_and_epoch_and_a_resumed_epoch_skips_what_was_used() -> None:
    sampler = EpochShuffleSampler(40, seed=1, num_replicas=2, rank=1)
    sampler.set_epoch(2)
    epoch_2 = list(sampler)
    assert epoch_2 != list(EpochShuffleSampler(40, seed=1, num_replicas=2, rank=1))  # epoch 0
    assert epoch_2 != list(EpochShuffleSampler.of_rank(None, 40, seed=2, position={"epoch": 2, "used": 0}))
    sampler.advance(6)
    state = sampler.state_dict()
    assert state == {"epoch": 2, "used": 6}
    resumed = EpochShuffleSampler(40, seed=1, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # Lightning sets the same epoch again on resume
    assert list(resumed) == epoch_2[6:]
    resumed.set_epoch(3)
    assert resumed.state_dict() == {"epoch": 3, "used": 0} and len(list(resumed)) == 20
    finished = EpochShuffleSampler(40, seed=1, num_replicas=2, rank=1)
    finished.load_state_dict({"epoch": 2, "used": 20})  # saved after the last batch of epoch 2
    assert finished.state_dict() == {"epoch": 3, "used": 0}


def test_the_training_loader_is_stateful_and_carries_the_datamodule_position() -> None:
    data = SyntheticData(num_samples=32, batch_size=8, image_size=16, num_workers=0, seed=0)
    data.load_state_dict({"device_batches": 3, "position": {"epoch": 1, "used": 16}})
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader, _Stateful) and loader.state_dict() == {"epoch": 1, "used": 16}
    assert data.state_dict() == {"device_batches": 3, "position": {"epoch": 1, "used": 16}}
    assert len(list(loader)) == 2 and len(loader) == 4  # the epoch's last 2 batches; Lightning counts 4


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.methods import MoCoV2
from ssl_lightning.optim import OptimConfig

out = sys.argv[1]


def fit(name, ckpt_path=None):
    seed_everything(0)
    model = MoCoV2(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, projection_hidden_dim=32,
                   projection_dim=16, queue_size=40, momentum=0.9, optim=OptimConfig(name="sgd", lr=0.5, warmup_epochs=1))
    data = SyntheticData(num_samples=34, batch_size=4, image_size=16, num_workers=0, seed=0)  # 4 batches per rank
    every_2 = ModelCheckpoint(dirpath=f"{out}/{name}", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, limit_val_batches=0, logger=False,
                      callbacks=[every_2], enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    torch.save({"model": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                "data": data.state_dict(), "loader": trainer.train_dataloader.state_dict(),
                "sampler": type(trainer.train_dataloader.sampler).__name__, "step": trainer.global_step},
               f"{out}/{name}_rank{trainer.global_rank}.pt")


fit("full")
print("RESUMING", flush=True)
fit("resumed", ckpt_path=f"{out}/full/step=2.ckpt")  # mid-epoch 0; the resumed run goes on into epoch 1
"""


def test_two_process_ddp_resume_from_mid_epoch_is_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Restoring states from the checkpoint" in output
    assert "not resumable" not in output, output[output.index("not resumable") - 300 :][:600]
    checkpoint = torch.load(tmp_path / "full" / "step=2.ckpt", weights_only=False)
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "used": 8}]
    for rank in (0, 1):
        full = torch.load(tmp_path / f"full_rank{rank}.pt", weights_only=False)
        resumed = torch.load(tmp_path / f"resumed_rank{rank}.pt", weights_only=False)
        assert full["sampler"] == "EpochShuffleSampler" and full["step"] == 6
        assert full["loader"] == {"epoch": 1, "used": 8}  # 6 steps of 4 images: epoch 0's 4 batches, 2 of epoch 1
        assert_same(full, resumed, f"rank {rank}")
