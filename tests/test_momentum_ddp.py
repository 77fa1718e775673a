"""MoCo v2 under Lightning DDP on 2 CPU processes (slow: 20-40 s to start): shuffle-BN across ranks, the
momentum update and the queue run without deadlock, and both ranks end with the same queue, pointer and
key encoder weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = """
import sys, torch, warnings
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
from lightning.pytorch import Trainer, seed_everything
from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.methods import MoCoV2
from ssl_lightning.optim import OptimConfig

seed_everything(0)
model = MoCoV2(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, projection_hidden_dim=32,
               projection_dim=16, queue_size=40, momentum=0.9, optim=OptimConfig(name="sgd", lr=0.5, warmup_epochs=0))
data = SyntheticData(num_samples=64, batch_size=4, image_size=16, num_workers=0, seed=0)
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, limit_val_batches=0, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, data)
torch.save({k: v for k, v in model.state_dict().items() if k.startswith(("queue", "key_"))},
           f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_moco_v2_queue_and_key_encoder_agree_across_two_ddp_processes(tmp_path: Path) -> None:
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    # BatchNorm running statistics are each rank's own since the last forward (DDP broadcasts rank 0's
    # buffers at the start of each forward); everything else must agree
    shared = [k for k in rank0 if "running_" not in k]
    assert "queue" in shared and any(k.startswith("key_projector") for k in shared)
    assert all(torch.equal(rank0[k], rank1[k]) for k in shared), [k for k in shared if not torch.equal(rank0[k], rank1[k])]
    assert rank0["queue_ptr"].item() == 3 * 2 * 4  # 3 steps of 4 keys from each of 2 ranks
    filled = rank0["queue"][:24]
    torch.testing.assert_close(filled.norm(dim=1), torch.ones(24))  # normalized keys
