"""Tiny ``ssl-lightning fit`` arguments and a subprocess runner for the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from lightning.pytorch import Callback

from ssl_lightning.methods import SimCLR

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SIMCLR = CONFIGS / "simclr_bundled.yaml"
TINY_SIMCLR = [
    f"--config={SIMCLR}",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_model_summary=false",
    "--model.init_args.backbone_kwargs={base_width: 4}",
    "--model.init_args.projection_hidden_dim=32",
    "--model.init_args.projection_dim=16",
    "--data=SyntheticData",
    "--data.init_args.num_samples=32",
    "--data.init_args.image_size=16",
    "--data.init_args.batch_size=8",
    "--data.init_args.num_workers=0",
    "--data.init_args.views.size=16",
]


def command_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test's ``ssl-lightning`` subprocess: one thread, no W&B, ``tests`` importable."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **(env or {})}
    for name in ("SSL_LIGHTNING_DEBUG", "SSL_LIGHTNING_RUN_DIR", "LOCAL_RANK", "RANK", "SLURM_JOB_ID"):
        environment.pop(name, None)
    return environment


COMMAND = [sys.executable, "-m", "ssl_lightning.cli"]


def run_command(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``ssl-lightning ARGS`` in a subprocess (one thread), with its exit code and output."""
    return subprocess.run([*COMMAND, *args], cwd=cwd, env=command_environment(env), capture_output=True, text=True,
                          timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The lines of stderr that report an error (the one line a failing command prints)."""
    return [line for line in result.stderr.splitlines() if "error:" in line]


class StepReporter(Callback):
    """Prints ``step N`` after each optimizer step and waits a little, so a test can signal a running fit."""

    def __init__(self, seconds: float = 0.3) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"step {trainer.global_step}", flush=True)
        time.sleep(self.seconds)


class SimCLRDivergingAtStep3(SimCLR):
    """SimCLR whose loss (and a logged term) turns NaN at global step 3: a run that diverges on cue."""

    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        if self.trainer.global_step == 3:
            output["loss"] = output["loss"] * float("nan")
            self.log("train/diverging_term", output["loss"])
        return output
