"""Runs left alone on a cluster: SIGTERM mid-epoch saves the step reached and exits non-zero, the resumed
run ends bit-identical to an uninterrupted one; a diverging run stops loudly and keeps a finite last.ckpt."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import torch

from ssl_lightning.callbacks.preemption import PREEMPTED_EXIT_CODE
from tests.cli_utils import COMMAND, TINY_SIMCLR, command_environment, run_command

STEPS = 12  # 4 optimizer steps per epoch (32 images, batch 8): SIGTERM lands mid-epoch
REPORTER = "--trainer.callbacks+=tests.cli_utils.StepReporter"


def fit_args(runs_root: str, *extra: str) -> list[str]:
    return ["fit", *TINY_SIMCLR, f"--trainer.max_steps={STEPS}", f"--runs_root={runs_root}", *extra]


def last_checkpoint(root: Path) -> dict:
    (path,) = list(root.glob("*/*/checkpoints/*.ckpt"))  # one run, one last.ckpt (no last-v1.ckpt after a resume)
    assert path.name == "last.ckpt"
    return torch.load(path, weights_only=True)


def test_sigterm_mid_epoch_saves_the_step_reached_and_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    full = run_command(fit_args("full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]

    process = subprocess.Popen([*COMMAND, *fit_args("stopped", REPORTER)], cwd=tmp_path, env=command_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # type: ignore[union-attr]
        if line.rstrip().endswith("step 6"):  # the progress bar shares stdout
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-2000:]
    stopped = last_checkpoint(tmp_path / "stopped")
    reached = stopped["global_step"]
    assert 6 <= reached < STEPS and reached % 4 != 0, f"expected a mid-epoch stop, got step {reached}"

    resumed = run_command(fit_args("stopped", "--ckpt_path=last"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    expected, got = last_checkpoint(tmp_path / "full"), last_checkpoint(tmp_path / "stopped")
    assert got["global_step"] == expected["global_step"] == STEPS
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    for a, b in zip(expected["optimizer_states"][0]["state"].values(), got["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverging_run_stops_with_the_step_and_term_and_keeps_a_finite_checkpoint(tmp_path: Path) -> None:
    result = run_command(
        fit_args("runs", "--model=tests.cli_utils.SimCLRDivergingAtStep3", "--model.init_args.backbone_kwargs={base_width: 4}",
                 "--model.init_args.projection_hidden_dim=32", "--model.init_args.projection_dim=16",
                 "--safety.checkpoint_every_n_train_steps=1"),
        cwd=tmp_path,
    )
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert "SimCLRDivergingAtStep3" in errors[0] and "step 3" in errors[0] and "train/diverging_term" in errors[0]
    checkpoint = last_checkpoint(tmp_path / "runs")
    assert checkpoint["global_step"] == 3
    assert all(value.isfinite().all() for value in checkpoint["state_dict"].values() if value.is_floating_point())
