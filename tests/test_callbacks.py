"""Online probe, kNN monitor and view grid on a tiny stand-in method and datamodule (per docs/CONTRACTS.md)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ssl_lightning.callbacks import KNNMonitor, OnlineLinearProbe, ViewGridLogger
from ssl_lightning.callbacks import knn_monitor, online_probe
from ssl_lightning.scoring import extract_features, knn_accuracy

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class Backbone(nn.Module):
    def __init__(self, feature_dim: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, feature_dim))
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyMethod(LightningModule):
    """Two-view alignment loss; ``forward`` gives features, as an ``SSLMethod`` does."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.lr = lr

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        z1, z2 = (F.normalize(self.backbone(v), dim=1) for v in batch["views"])
        loss = (z1 - z2).pow(2).sum(dim=1).mean()
        # Deliberately NOT detached (the contract says it is): a probe that forgot to detach would
        # backpropagate into the backbone through this fresh graph.
        return {"loss": loss, "features": self.backbone(batch["views"][0])}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return {"features": self(batch["image"]).detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Views(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        views = [self.x[i] + 0.1 * torch.randn(3, 4, 4) for _ in range(2)]  # global RNG, main process
        return {"views": views, "label": self.y[i]}


class Images(Views):
    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


class ToyData(LightningDataModule):
    """Gaussian clusters of 3x4x4 'images', one per class: linearly separable."""

    mean, std = MEAN, STD

    def __init__(self, labelled: bool = True, n: int = 128, num_classes: int = 4, batch_size: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        centers = 2 * torch.randn(num_classes, 3, 4, 4, generator=g)
        y = torch.arange(2 * n) % num_classes
        x = centers[y] + 0.5 * torch.randn(2 * n, 3, 4, 4, generator=g)
        self.x_train, self.x_val = x[:n], x[n:]
        self.y_train, self.y_val = (y[:n], y[n:]) if labelled else (torch.full((n,), -1), torch.full((n,), -1))
        self.num_classes = num_classes if labelled else None
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Views(self.x_train, self.y_train), self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Images(self.x_val, self.y_val), self.batch_size)

    def train_eval_dataset(self) -> Dataset:
        return Images(self.x_train, self.y_train)

    def val_dataset(self) -> Dataset | None:
        return Images(self.x_val, self.y_val) if self.num_classes is not None else None

    def eval_loader(self, dataset: Dataset, rank: int = 0, world_size: int = 1) -> DataLoader:
        return DataLoader(Subset(dataset, range(rank, len(dataset), world_size)), batch_size=50)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[dict, int | None]] = []

    name, version = "recording", 0

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.logged.append((dict(metrics), step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def fit(
    callbacks: list[Callback],
    data: ToyData | None = None,
    model: TinyMethod | None = None,
    ckpt_path: str | None = None,
    **kwargs: Any,
) -> tuple[Trainer, TinyMethod]:
    seed_everything(0)
    model = model or TinyMethod()
    data = data or ToyData()
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer = Trainer(**{**options, **kwargs})
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.parametrize("make_callback", [lambda: OnlineLinearProbe(lr=0.1), lambda: KNNMonitor(print_summary=False)])
def test_callback_does_not_change_backbone_gradients_or_training(make_callback) -> None:
    _, plain = fit([], max_steps=3, limit_val_batches=0)
    callback = make_callback()
    _, probed = fit([callback], max_steps=3, limit_val_batches=0)
    for (name, p), q in zip(plain.backbone.named_parameters(), probed.backbone.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
        assert torch.equal(p, q), name
    if isinstance(callback, OnlineLinearProbe):
        assert callback.head.weight.abs().sum() > 0 and callback.head.weight.grad is not None
    else:
        assert callback.before is not None and callback.after is not None


class SeededViews(Views):
    """Views whose noise depends on the item alone: every epoch, and a resumed run, sees the same data."""

    def __getitem__(self, i: int) -> dict:
        generator = torch.Generator().manual_seed(i)
        return {"views": [self.x[i] + 0.1 * torch.randn(3, 4, 4, generator=generator) for _ in range(2)],
                "label": self.y[i]}


class SeededToyData(ToyData):
    """Unshuffled training batches; under DDP rank r takes items r, r + w, ... (Lightning keeps a loader's own
    ``DistributedSampler``, where it would otherwise put a shuffled one), so w ranks' batches of B together
    are one process's batch of w * B."""

    def train_dataloader(self) -> DataLoader:
        dataset = SeededViews(self.x_train, self.y_train)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if world_size == 1:
            return DataLoader(dataset, self.batch_size, shuffle=False, drop_last=True)
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(dataset, self.batch_size, sampler=sampler, drop_last=True)


def test_probe_learns_separable_classes_and_resumes(tmp_path) -> None:
    probe = OnlineLinearProbe(lr=0.05)
    trainer, model = fit([probe], data=SeededToyData(), max_epochs=6)
    data = trainer.datamodule  # the logged top-1 is in percent, as val/knn_top1: the final head on the val features
    features, labels = extract_features(model, data.eval_loader(data.val_dataset()), "cpu")
    with torch.no_grad():
        reference = 100.0 * (probe.head(features).argmax(1) == labels).double().mean().item()
    assert trainer.callback_metrics["val/probe_top1"].item() == pytest.approx(reference) and reference > 95
    assert torch.isfinite(trainer.callback_metrics["train/probe_loss"])

    # stopped after 3 of 6 epochs and resumed: the 3 epochs trained after the resume end where the
    # uninterrupted run does (head, probe optimizer, backbone)
    stopped = OnlineLinearProbe(lr=0.05)
    fit([stopped], data=SeededToyData(), max_epochs=3)[0].save_checkpoint(tmp_path / "epoch3.ckpt")
    at_checkpoint = stopped.head.weight.detach().clone()
    restored = OnlineLinearProbe(lr=0.05)
    resumed, resumed_model = fit([restored], data=SeededToyData(), model=TinyMethod(), max_epochs=6,
                                 ckpt_path=str(tmp_path / "epoch3.ckpt"))
    assert resumed.global_step == trainer.global_step == 6 * 4
    assert not torch.equal(restored.head.weight, at_checkpoint)  # it trained after resuming
    assert torch.equal(restored.head.weight, probe.head.weight) and torch.equal(restored.head.bias, probe.head.bias)
    state, expected = restored.optimizer.state_dict()["state"], probe.optimizer.state_dict()["state"]
    assert state.keys() == expected.keys() and state
    for key in state:
        assert all(torch.equal(state[key][name], expected[key][name]) for name in state[key])
    for (name, p), q in zip(model.backbone.named_parameters(), resumed_model.backbone.parameters()):
        assert torch.equal(p, q), name


def test_unlabeled_data_trains_with_probe_and_knn_disabled(monkeypatch, capsys) -> None:
    messages: list[str] = []
    monkeypatch.setattr(online_probe, "rank_zero_info", messages.append)
    monkeypatch.setattr(knn_monitor, "rank_zero_info", messages.append)
    probe, knn = OnlineLinearProbe(), KNNMonitor()
    trainer, _ = fit([probe, knn], data=ToyData(labelled=False), max_steps=4, limit_val_batches=1)
    assert trainer.global_step == 4
    assert probe.head is None and not knn.enabled and knn.before is None and knn.after is None
    assert len(messages) == 2 and all("no labels" in m for m in messages)
    assert "val/probe_top1" not in trainer.callback_metrics and "val/knn_top1" not in trainer.callback_metrics
    assert "knn_top1" not in capsys.readouterr().out


@pytest.mark.parametrize("limit_val_batches", [1.0, 0])
def test_knn_monitor_evaluates_final_network_once_and_prints_summary_last(
    monkeypatch, capsys, limit_val_batches
) -> None:
    steps: list[int] = []
    evaluate = KNNMonitor._evaluate

    def counting(self, trainer, pl_module):
        steps.append(trainer.global_step)
        return evaluate(self, trainer, pl_module)

    monkeypatch.setattr(KNNMonitor, "_evaluate", counting)
    knn, logger = KNNMonitor(k=20), RecordingLogger()
    trainer, model = fit([knn], max_epochs=2, limit_val_batches=limit_val_batches, logger=logger)
    final = trainer.global_step
    assert steps == [0, final // 2, final] if limit_val_batches else steps == [0, final]

    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"knn_top1 before=(\d+\.\d\d) after=(\d+\.\d\d) seconds=(\d+\.\d)", last)
    assert match, last
    assert isinstance(knn.before, float) and isinstance(knn.after, float)
    assert 0.0 <= knn.before <= 100.0 and 0.0 <= knn.after <= 100.0
    assert float(match[1]) == round(knn.before, 2) and float(match[2]) == round(knn.after, 2)

    data = trainer.datamodule
    bank = extract_features(model, data.eval_loader(data.train_eval_dataset()), "cpu")
    query = extract_features(model, data.eval_loader(data.val_dataset()), "cpu")
    assert knn.after == knn_accuracy(*query, *bank, num_classes=4, k=20, temperature=0.1)[0]
    knn_logs = [(m["val/knn_top1"], step) for m, step in logger.logged if "val/knn_top1" in m]
    assert len(knn_logs) == len(steps) and knn_logs[0] == (knn.before, 0)
    assert knn_logs[-1][0] == pytest.approx(knn.after)


class KeepFirstBatch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.views = [v.clone() for v in batch["views"]]


def test_view_grid_png_tensorboard_and_wandb(tmp_path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    keep = KeepFirstBatch()
    loggers = [TensorBoardLogger(tmp_path / "tb"), WandbLogger(save_dir=tmp_path / "wandb", project="test")]
    try:
        trainer, _ = fit([keep, ViewGridLogger(num_images=3)], max_steps=2, limit_val_batches=0, logger=loggers)
    finally:
        wandb.finish()

    # rows = samples, columns = views, 4x4 images with 2-pixel padding, denormalized to [0, 1]
    png = Image.open(os.path.join(trainer.log_dir, "views.png"))
    assert png.format == "PNG" and png.size == (2 * 6 + 2, 3 * 6 + 2)
    pixels = np.asarray(png.convert("RGB"))
    for sample in range(3):
        for view in range(2):
            expected = keep.views[view][sample] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
            expected = expected.clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            top, left = 2 + 6 * sample, 2 + 6 * view
            np.testing.assert_array_equal(pixels[top : top + 4, left : left + 4], expected)

    events = EventAccumulator(loggers[0].log_dir)
    events.Reload()
    assert "views" in events.Tags()["images"]
    assert glob.glob(str(tmp_path / "wandb" / "wandb" / "*run-*" / "files" / "media" / "images" / "views_*.png"))


DDP_SCRIPT = """
import sys
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from ssl_lightning.callbacks import KNNMonitor, OnlineLinearProbe, ViewGridLogger
from tests.test_callbacks import SeededToyData, TinyMethod

out = sys.argv[1]
seed_everything(0)
probe, knn, model = OnlineLinearProbe(lr=0.05, optimizer="sgd"), KNNMonitor(k=20), TinyMethod()
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, num_sanity_val_steps=0,
                  logger=TensorBoardLogger(out), enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[probe, knn, ViewGridLogger(num_images=2)])
trainer.fit(model, datamodule=SeededToyData(batch_size=32))  # unshuffled: rank r gets items r, r + 2, ...
torch.save({"head": probe.head.state_dict(), "before": knn.before, "after": knn.after,
            "backbone": model.backbone.state_dict()}, f"{out}/rank{trainer.global_rank}.pt")
"""


def test_ddp_two_processes_agree(tmp_path) -> None:
    """2 DDP processes (one start, ~13-30 s here) against one process on the same global batches."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": root}
    command = [sys.executable, str(script), str(tmp_path)]
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = r"knn_top1 before=\d+\.\d\d after=\d+\.\d\d seconds=\d+\.\d"
    assert re.fullmatch(summary, run.stdout.strip().splitlines()[-1])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in ranks[0]["head"].items():
        assert torch.equal(value, ranks[1]["head"][name]), name
    assert ranks[0]["before"] == ranks[1]["before"] and ranks[0]["after"] == ranks[1]["after"]
    # one process on the global batches (the two ranks' batches of 32 are its batches of 64): the same head,
    # backbone and kNN accuracies. Float tolerance: under DDP the gradient is the mean of the two ranks'
    # batch means, summed in another order than one mean over 64 rows (float32 rounding, ~1e-7 per step).
    # The probe uses SGD: Adam is invariant to a constant gradient scale, so gradients summed over the ranks
    # instead of averaged would pass with it.
    probe, knn = OnlineLinearProbe(lr=0.05, optimizer="sgd"), KNNMonitor(k=20, print_summary=False)
    trainer, model = fit([probe, knn], data=SeededToyData(batch_size=64), max_epochs=2)
    assert trainer.global_step == 2 * 2
    for part, state in (("head", probe.head.state_dict()), ("backbone", model.backbone.state_dict())):
        for name, value in state.items():
            torch.testing.assert_close(ranks[0][part][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda message, name=f"{part}.{name}": f"{name}: {message}")
    assert (ranks[0]["before"], ranks[0]["after"]) == (knn.before, knn.after)
    assert glob.glob(str(tmp_path / "lightning_logs" / "*" / "views.png"))
