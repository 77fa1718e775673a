"""``AtomicCheckpointIO``: a failed or interrupted save never replaces a good checkpoint; ``PeriodicCheckpoint``
writes last.ckpt every N steps or M minutes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from ssl_lightning.callbacks.periodic_checkpoint import PeriodicCheckpoint
from ssl_lightning.checkpoint_io import AtomicCheckpointIO
from ssl_lightning.methods import SimCLR
from tests.tiny_methods import tiny_data


def test_save_renames_a_temporary_file_of_the_same_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same folder, so the rename is atomic (a temporary file elsewhere may be on another filesystem)."""
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst)))
    target = tmp_path / "sub" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(5.0)}, "global_step": 3}, target)
    assert len(renames) == 1 and renames[0][1] == target and renames[0][0].parent == target.parent
    loaded = AtomicCheckpointIO().load_checkpoint(target)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(5.0)) and loaded["global_step"] == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_a_save_that_fails_midway_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "w": torch.ones(1000)}, target)
    good = target.read_bytes()
    real_save = torch.save

    def broken_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"half a checkpoint")  # some bytes reach the file, then the write dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 3, "w": torch.zeros(1000)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert target.read_bytes() == good
    assert io.load_checkpoint(target)["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "the temporary file was left behind"


def test_model_checkpoint_save_last_goes_through_the_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ModelCheckpoint(save_last=True) writes last.ckpt with ``checkpoint_io.save_checkpoint`` (not a copy)."""
    saved: list[str] = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self: AtomicCheckpointIO, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        saved.append(Path(path).name)
        real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    every_step = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[every_step], plugins=[AtomicCheckpointIO()])
    model = SimCLR(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, projection_hidden_dim=32, projection_dim=16)
    trainer.fit(model, tiny_data())
    assert saved == ["last.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 2


@pytest.mark.parametrize(
    ("steps", "minutes", "saved_at"),
    [(2, None, [2, 4, 5]), (None, 1e-9, [1, 2, 3, 4, 5]), (2, 60.0, [2, 4, 5]), (100, 1e-9, [1, 2, 3, 4, 5]),
     (None, None, [4, 5])],
    ids=["every-2-steps", "time-only", "steps-first", "time-first", "epoch-ends-only"],
)
def test_periodic_checkpoint_saves_on_whichever_trigger_comes_first(
    steps: int | None, minutes: float | None, saved_at: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny ``every_n_minutes`` fires at every step (each step takes longer); 60 minutes never fires here;
    every epoch end (4 steps, and step 5 where max_steps stops the second epoch) saves too, once per step."""
    saved: list[int] = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self: AtomicCheckpointIO, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        assert Path(path).name == "last.ckpt", "only last.ckpt is written"
        saved.append(checkpoint["global_step"])
        real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    periodic = PeriodicCheckpoint(every_n_train_steps=steps, every_n_minutes=minutes, dirpath=tmp_path)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=5, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[periodic], plugins=[AtomicCheckpointIO()])
    model = SimCLR(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, projection_hidden_dim=32, projection_dim=16)
    trainer.fit(model, tiny_data())
    assert saved == saved_at
