"""No host synchronisation per training step beyond ``NonFiniteGuard``'s one (none in fine-tuning; issue 13: a GPU step must not wait
for the host): a fit with the configs' callbacks, loggers and progress bar, counting every tensor-to-host read.

On the CPU nothing waits, so the test counts the reads that would wait on a GPU: ``item``, ``tolist``, ``bool``,
``float``, ``int``, ``cpu`` and ``numpy`` of a tensor, between one batch's start and the next. Left out: the step
counters of torch's optimizers (``torch/optim/optimizer.py``'s ``_get_value``), which torch keeps on the host on a
GPU too, and the data loader's reads of its host tensors. Periodic steps may read more: logging (every
``log_every_n_steps``, when the loggers and the progress bar read their values) and ``CollapseMonitor`` (every 50
batches, from the first) and the last step, after which the bar redraws; every other step reads exactly once, in
the guard.
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback

from ssl_lightning.callbacks import LogFriendlyProgressBar
from ssl_lightning.methods.training_log import TrainingLog
from ssl_lightning.cli.lightning_cli import run_cli
from ssl_lightning.cli.run_folder import RUN_DIR_ENV
from tests.cli_utils import CONFIGS

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
LOG_EVERY = 5
STEPS = 12


def periodic(step: int) -> bool:
    """A step at which logging or a monitor reads the host on purpose (see the module's docstring)."""
    return (step + 1) % LOG_EVERY == 0 or step % 50 == 0 or step == STEPS - 1

TINY = {
    "simclr": ["--model.init_args.projection_hidden_dim=32", "--model.init_args.projection_dim=16"],
    "byol": ["--model.init_args.projection_hidden_dim=32", "--model.init_args.projection_dim=16",
             "--model.init_args.prediction_hidden_dim=32"],
    "moco_v2": ["--model.init_args.projection_hidden_dim=32", "--model.init_args.queue_size=32"],
}


class HostReadCounter(Callback):
    """Records, per global step, the source line of every tensor-to-host read made in the training loop."""

    def __init__(self) -> None:
        self.reads: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self.step: int | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.step = trainer.global_step

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.step = None  # epoch-end work (kNN, probe accuracy) reads once per epoch, not per step

    def record(self, name: str) -> None:
        if self.step is None:
            return
        frames = [f for f in traceback.extract_stack()[:-2] if not f.filename.endswith("test_host_syncs.py")]
        if frames[-1].filename.endswith("torch/optim/optimizer.py"):  # host-resident step counters
            return
        if any("/torch/utils/data/" in f.filename for f in frames):  # the loader's own host tensors
            return
        site = next(f for f in reversed(frames) if "/torch/" not in f.filename or "/optim/" in f.filename)
        self.reads[self.step][f"{Path(site.filename).name}:{site.lineno} {name}"] += 1


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostReadCounter]:
    counter = HostReadCounter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _original=original, _name=name, **kwargs: Any) -> Any:
            counter.record(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield counter


@pytest.mark.parametrize("method", sorted(TINY))
def test_a_training_step_reads_the_host_once(method: str, counter: HostReadCounter, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    torch.set_num_threads(1)
    cli = run_cli(["fit", f"--config={CONFIGS / f'{method}_bundled.yaml'}", "--trainer.accelerator=cpu",
                   "--trainer.devices=1", f"--trainer.max_steps={STEPS}", f"--trainer.log_every_n_steps={LOG_EVERY}",
                   "--trainer.limit_val_batches=0", "--trainer.enable_model_summary=false",
                   "--model.init_args.backbone_kwargs={base_width: 4}", *TINY[method],
                   "--data=SyntheticData", "--data.init_args.num_samples=800", "--data.init_args.image_size=16",
                   "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
                   "--data.init_args.views.size=16"], run=False)
    cli.trainer.callbacks.append(counter)
    cli.trainer.fit(cli.model, cli.datamodule)

    assert sorted(counter.reads) == list(range(STEPS))
    guard = {site for reads in counter.reads.values() for site in reads if site.startswith("nonfinite.py")}
    assert len(guard) == 1, f"NonFiniteGuard should read the host at one place, got {guard}"
    for step, reads in counter.reads.items():
        assert reads[next(iter(guard))] == 1, f"step {step}: {dict(reads)}"
        if not periodic(step):  # nothing else may wait for the device
            assert sum(reads.values()) == 1, f"step {step} reads the host beyond the guard: {dict(reads)}"
    bar = next(c for c in cli.trainer.callbacks if isinstance(c, LogFriendlyProgressBar))
    shown = bar.get_metrics(cli.trainer, cli.model)  # the loss is still in the bar, read at its redraw
    assert shown["train/loss"] == pytest.approx(float(cli.trainer.callback_metrics["train/loss"]))



def test_a_finetuning_step_reads_the_host_only_when_logging(counter: HostReadCounter) -> None:
    from ssl_lightning.eval.finetune import FineTuneConfig, finetune
    from tests.test_finetune import ColourData, tiny_resnet

    torch.set_num_threads(1)
    steps = 60  # the bar redraws every 6th step (a tenth of the epoch), where logging reads too
    result = finetune(tiny_resnet(), ColourData(num_train=2 * steps), config=FineTuneConfig(epochs=1, batch_size=2),
                      trainer_kwargs=dict(accelerator="cpu", devices=1, callbacks=[counter], log_every_n_steps=6))

    assert result.trainer.global_step == steps
    redraws = [step for step in range(steps) if (step + 1) % 6 == 0]
    assert sorted(counter.reads) == redraws, {step: dict(reads) for step, reads in counter.reads.items()}
    bar = next(c for c in result.trainer.callbacks if isinstance(c, LogFriendlyProgressBar))
    shown = bar.get_metrics(result.trainer, result.model)  # the loss is still in the bar, read at its redraw
    assert shown["finetune/train_loss"] == pytest.approx(float(result.trainer.callback_metrics["finetune/train_loss"]))


class _LinearRegression(TrainingLog):
    """The smallest TrainingLog: a linear layer whose training loss goes to the progress bar."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.layer(inputs).squeeze(1), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_training_log_keeps_bar_values_out_of_lightnings_per_step_copy() -> None:
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(16, 3), torch.randn(16))
    model = _LinearRegression()
    bar = LogFriendlyProgressBar()
    trainer = Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_model_summary=False, callbacks=[bar])
    trainer.fit(model, DataLoader(data, batch_size=4))
    assert model.progress_bar_names == {"train/loss"}
    assert "train/loss" not in trainer.progress_bar_metrics  # Lightning copied nothing to the host for the bar
    assert bar.get_metrics(trainer, model)["train/loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]))
