"""Resume from a checkpoint continues exactly like an uninterrupted run (SimCLR, device views, probe)."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from ssl_lightning.callbacks import OnlineLinearProbe
from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.methods import SimCLR
from ssl_lightning.optim import OptimConfig


def _fit(max_steps: int, root: Path, ckpt_path: str | None = None) -> tuple[SimCLR, OnlineLinearProbe, Trainer]:
    seed_everything(0)
    model = SimCLR(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, projection_hidden_dim=32,
                   projection_dim=16, optim=OptimConfig(name="lars", lr=0.5, warmup_epochs=1))
    data = SyntheticData(num_samples=32, batch_size=8, num_workers=0)
    probe = OnlineLinearProbe()
    every_4_steps = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=-1, callbacks=[probe, every_4_steps], logger=False,
                      default_root_dir=root, deterministic=True, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, probe, trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimCLR, OnlineLinearProbe, Path]:
    root = tmp_path_factory.mktemp("full")
    model, probe, _ = _fit(8, root)
    return model, probe, root


@pytest.mark.parametrize("stop_step", [4, 6], ids=["epoch-boundary", "mid-epoch"])
def test_resume_matches_uninterrupted_run(uninterrupted, stop_step: int, tmp_path: Path) -> None:
    full, full_probe, root = uninterrupted  # 4 steps = one epoch of 32 images in batches of 8
    resumed, resumed_probe, trainer = _fit(8, tmp_path, ckpt_path=str(root / f"step={stop_step}.ckpt"))
    assert trainer.global_step == 8
    floating = [k for k, v in full.state_dict().items() if v.is_floating_point()]
    assert floating, "nothing to compare"
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert torch.equal(full_probe.head.weight, resumed_probe.head.weight)
