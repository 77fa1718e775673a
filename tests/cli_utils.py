"""Tiny ``ssl-lightning fit`` arguments and a subprocess runner for the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
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


def run_command(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``ssl-lightning ARGS`` in a subprocess (one thread), with its exit code and output."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    environment.pop("SSL_LIGHTNING_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "ssl_lightning.cli", *args], cwd=cwd, env=environment, capture_output=True, text=True,
        timeout=timeout,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The lines of stderr that report an error (the one line a failing command prints)."""
    return [line for line in result.stderr.splitlines() if "error:" in line]
