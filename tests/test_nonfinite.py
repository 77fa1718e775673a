"""``NonFiniteGuard``: a non-finite loss term stops the run before the bad update (naming step, method,
term) and ``last.ckpt`` stays finite; the opt-in skip mode leaves weights and optimizer state untouched."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

import ssl_lightning.methods.barlow_twins as barlow_twins_module
from ssl_lightning.callbacks import NonFiniteError, NonFiniteGuard
from ssl_lightning.methods import BarlowTwins
from ssl_lightning.optim import OptimConfig
from tests.tiny_methods import tiny_data


class Snapshots(Callback):
    """The state dict, the parameters and the optimizer state after each optimizer step, by ``global_step``."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer: dict[int, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())
        self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        self.optimizer[trainer.global_step] = copy.deepcopy(trainer.optimizers[0].state_dict())


def _poison_off_diag(monkeypatch: pytest.MonkeyPatch, bad_steps: Callable[[int], bool], get_step: Callable[[], int]) -> None:
    """Barlow Twins' off-diagonal term (and so the loss) is NaN at the steps ``bad_steps`` selects."""
    real = barlow_twins_module.barlow_twins_loss

    def poisoned(z1: torch.Tensor, z2: torch.Tensor, weight: float) -> Any:
        terms = real(z1, z2, weight)
        if not bad_steps(get_step()):
            return terms
        off_diag = terms.off_diag * float("nan")
        return terms._replace(off_diag=off_diag, loss=terms.on_diag + weight * off_diag)

    monkeypatch.setattr(barlow_twins_module, "barlow_twins_loss", poisoned)


def _fit(root: Path, max_steps: int, callbacks: list[Callback], optimizer: str = "lars",
         poison: Optional[tuple[pytest.MonkeyPatch, Callable[[int], bool]]] = None) -> tuple[BarlowTwins, Trainer]:
    seed_everything(0, verbose=False)
    model = BarlowTwins(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, projection_hidden_dim=32,
                        projection_dim=16, optim=OptimConfig(name=optimizer, lr=0.1, warmup_epochs=0))
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, logger=False,
                      default_root_dir=root, deterministic=True, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    if poison is not None:
        _poison_off_diag(poison[0], poison[1], lambda: trainer.global_step)
    trainer.fit(model, tiny_data())
    return model, trainer


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_term_stops_the_run_before_the_update_and_last_ckpt_stays_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    with pytest.raises(NonFiniteError) as error:
        _fit(tmp_path, 6, [NonFiniteGuard(), every_step], poison=(monkeypatch, lambda step: step == 3))
    message = str(error.value)
    assert "BarlowTwins" in message and "global step 3" in message and "train/off_diag" in message
    assert "train/on_diag" not in message, "a finite term was named"
    monkeypatch.undo()
    clean = Snapshots()
    _fit(tmp_path / "clean", 6, [clean])  # the same run without guard or NaN
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    assert _finite(last["state_dict"]) and _same(last["state_dict"], clean.states[3])


@pytest.mark.parametrize("optimizer", ["lars", "sgd", "adamw"])
def test_skip_mode_leaves_weights_and_optimizer_state_untouched(optimizer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots, guard = Snapshots(), NonFiniteGuard(skip_nonfinite=True)
    model, trainer = _fit(tmp_path, 6, [guard, snapshots], optimizer, poison=(monkeypatch, lambda step: step in (2, 3)))
    assert trainer.global_step == 6 and guard.skipped == 2
    assert float(trainer.callback_metrics["train/skipped_nonfinite_steps"]) == 2
    for skipped in (3, 4):  # the steps taken at global_step 2 and 3 changed no parameter (BatchNorm statistics
        # are updated by the forward pass, as with a gradient scaler's skipped step)
        assert _same(snapshots.weights[skipped], snapshots.weights[2])
        assert repr(snapshots.optimizer[skipped]["state"]) == repr(snapshots.optimizer[2]["state"])
    assert not _same(snapshots.weights[5], snapshots.weights[4]), "training did not go on after the skipped steps"
    assert _finite(model.state_dict())


def test_skip_mode_stops_after_max_skipped_in_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        _fit(tmp_path, 8, [NonFiniteGuard(skip_nonfinite=True, max_skipped=2)], poison=(monkeypatch, lambda step: step >= 1))


def test_non_finite_gradients_of_a_finite_loss_stop_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sqrt'(0) = inf: ``0 * sqrt(w - w)`` adds 0 to the loss and NaN to w's gradient."""
    real = barlow_twins_module.barlow_twins_loss

    def nan_gradient(z1: torch.Tensor, z2: torch.Tensor, weight: float) -> Any:
        terms = real(z1, z2, weight)
        return terms._replace(loss=terms.loss + 0 * torch.sqrt(z1 - z1.detach()).sum())

    monkeypatch.setattr(barlow_twins_module, "barlow_twins_loss", nan_gradient)
    model_holder: list[BarlowTwins] = []
    with pytest.raises(NonFiniteError, match="non-finite gradients at global step 0"):
        _fit(tmp_path, 2, [NonFiniteGuard(), _Keep(model_holder)])
    assert _finite(model_holder[0].state_dict())


class _Keep(Callback):
    def __init__(self, holder: list[Any]) -> None:
        self.holder = holder

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.holder.append(pl_module)


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path: Path) -> None:
    model, trainer = _fit(tmp_path, 1, [NonFiniteGuard()])
    with torch.no_grad():
        next(model.projector.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to save a checkpoint at global step 1: 1 non-finite tensors"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def _guard_decisions(rank: int, world_size: int) -> list[str]:
    """One optimizer step on each rank, a NaN loss on rank 1 only: what each rank's guard decides."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    layer = torch.nn.Linear(2, 1)
    loss = layer(torch.ones(1, 2)).sum() * (float("nan") if rank == 1 else 1.0)
    if rank == 0:  # finite gradients on rank 0; rank 1's NaN shows only in its loss
        loss.backward()
    trainer = SimpleNamespace(strategy=DDPStrategy(), precision_plugin=SimpleNamespace(), global_step=5)
    module = SimpleNamespace(__dict__={})
    guard = NonFiniteGuard()
    guard.on_before_backward(trainer, module, loss)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    try:
        guard.on_before_optimizer_step(trainer, module, optimizer)
    except NonFiniteError as error:
        return [str(error)]
    return ["trained on"]


def test_every_rank_stops_when_one_rank_diverges() -> None:
    """The flag is all-reduced: rank 0, whose own loss and gradients are finite, stops too (no rank hangs)."""
    from tests.ddp_utils import run_distributed

    (decision,) = run_distributed(_guard_decisions, 2)
    assert "at global step 5" in decision and "loss (on another rank)" in decision
