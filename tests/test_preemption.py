"""``PreemptionCheckpoint``: SIGTERM / SLURM's requeue signal stop the run at the step reached, save it,
exit non-zero, and the resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from ssl_lightning.callbacks import PreemptionCheckpoint
from ssl_lightning.callbacks.preemption import preempted_exit_code, slurm_job_id
from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.methods import SimCLR
from ssl_lightning.optim import OptimConfig

REPO = Path(__file__).resolve().parents[1]
STEPS = 8  # 32 images in batches of 8: 4 optimizer steps per epoch, 2 epochs


class SignalDuringStep(Callback):
    """Sends ``signame`` to this process in the middle of optimizer step ``step`` (after its backward),
    on rank ``rank`` only."""

    def __init__(self, step: int, signame: str, rank: int = 0) -> None:
        self.step, self.signum, self.rank = step, signal.Signals[signame], rank

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if trainer.global_step + 1 == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


def _fit(root: Path, ckpt_path: Optional[str] = None, extra: Optional[Callback] = None,
         accumulate: int = 1, devices: int = 1) -> tuple[SimCLR, Trainer, PreemptionCheckpoint]:
    torch.set_num_threads(1)
    seed_everything(0, verbose=False)
    model = SimCLR(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, projection_hidden_dim=32,
                   projection_dim=16, optim=OptimConfig(name="lars", lr=0.5, warmup_epochs=1))
    data = SyntheticData(num_samples=32 * accumulate, batch_size=8, image_size=16, num_workers=0, seed=0)
    preemption = PreemptionCheckpoint()
    callbacks: list[Callback] = [preemption, ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0)]
    if extra is not None:
        callbacks.insert(0, extra)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=STEPS, accumulate_grad_batches=accumulate, callbacks=callbacks,
                      logger=False, default_root_dir=root, deterministic=True, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer, preemption


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert any(v.is_floating_point() for v in a.state_dict().values())
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def _saved_step(root: Path) -> int:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> SimCLR:
    model, trainer, preemption = _fit(tmp_path_factory.mktemp("full"))
    assert trainer.global_step == STEPS and preemption.preempted_by is None
    return model


def main() -> None:
    """The subprocess: ``python -c 'from tests.test_preemption import main; main()' ROOT STEP SIGNAL``."""
    root, step, signame = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    _fit(root, extra=SignalDuringStep(step, signame))


def test_sigterm_in_a_subprocess_saves_the_step_exits_143_and_resumes_exactly(uninterrupted: SimCLR, tmp_path: Path) -> None:
    script = "from tests.test_preemption import main; main()"
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), "6", "SIGTERM"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == preempted_exit_code("SIGTERM") == 143, result.stderr[-3000:]
    assert _saved_step(tmp_path) == 6  # mid-epoch: the second epoch's second step
    resumed, trainer, _ = _fit(tmp_path, ckpt_path="last")
    assert trainer.global_step == STEPS
    _assert_same_weights(uninterrupted, resumed)


def test_requeue_signal_under_slurm_saves_requeues_and_restores_handlers(
    uninterrupted: SimCLR, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "pretrain", "SLURM_JOB_ID": "1234", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_ARRAY_JOB_ID": "1200",
                       "SLURM_ARRAY_TASK_ID": "7"}.items():
        monkeypatch.setenv(key, value)
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        _fit(tmp_path, extra=SignalDuringStep(3, "SIGUSR1"))
    assert stopped.value.code == 138
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before
    assert _saved_step(tmp_path) == 3
    assert calls.read_text().split() == ["requeue", "1200_7"]
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt")), "Lightning's mid-step SLURM handler ran"
    for key in ("SLURM_NTASKS", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key)
    resumed, _, _ = _fit(tmp_path, ckpt_path="last")
    _assert_same_weights(uninterrupted, resumed)


def test_with_accumulation_the_run_stops_at_the_end_of_the_accumulated_step(tmp_path: Path) -> None:
    """A signal during the first of two accumulated batches stops the run after the second one."""

    class SignalInFirstMicroBatch(Callback):
        def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
            if batch_idx == 4:  # the first batch of optimizer step 3
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        _fit(tmp_path, extra=SignalInFirstMicroBatch(), accumulate=2)
    assert stopped.value.code == 143
    assert _saved_step(tmp_path) == 3
    full, _, _ = _fit(tmp_path / "full", accumulate=2)
    resumed, trainer, _ = _fit(tmp_path, ckpt_path="last", accumulate=2)
    assert trainer.global_step == STEPS
    _assert_same_weights(full, resumed)


@pytest.mark.slow
def test_under_ddp_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """Only rank 1 gets SIGTERM (mid-step 3): both ranks stop after step 3, save together, exit 143, no hang."""
    script = tmp_path / "ddp_preempt.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom tests.test_preemption import SignalDuringStep, _fit\n"
        "_fit(Path(sys.argv[1]), extra=SignalDuringStep(3, 'SIGTERM', rank=1), devices=2)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 143, result.stderr[-3000:]
    assert _saved_step(tmp_path) == 3


def test_without_model_checkpoint_the_checkpoint_goes_to_the_root_folder(tmp_path: Path) -> None:
    trainer = Trainer(default_root_dir=tmp_path, enable_checkpointing=False, logger=False)
    assert PreemptionCheckpoint._last_checkpoint_path(trainer) == str(tmp_path / "checkpoints" / "last.ckpt")


def test_slurm_job_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "99"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "90")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert slurm_job_id() == "90_4"
