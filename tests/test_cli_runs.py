"""Run folders, W&B runs, resume rules and loggers of ``ssl-lightning fit`` (in process, tiny SimCLR)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ssl_lightning.cli import run_cli
from ssl_lightning.cli.resume import ResumeError
from ssl_lightning.cli.run_folder import RUN_DIR_ENV, RunFolderError
from tests.cli_utils import CONFIGS, TINY_SIMCLR


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_NTASKS", "LOCAL_RANK", "RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def fit(*extra: str):
    return run_cli(["fit", *TINY_SIMCLR, *extra])


def test_each_run_gets_its_own_folder_with_config_checkpoints_and_logs(tmp_path: Path, capsys) -> None:
    first, second = fit("--trainer.max_steps=2"), fit("--trainer.max_steps=2")
    runs = tmp_path / "runs" / "simclr_bundled"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    out = capsys.readouterr().out
    assert "run folder runs/simclr_bundled/version_0" in out and "run folder runs/simclr_bundled/version_1" in out
    for cli, run in ((first, runs / "version_0"), (second, runs / "version_1")):
        assert Path(cli.trainer.checkpoint_callback.last_model_path) == (run / "checkpoints" / "last.ckpt").resolve() or \
            Path(cli.trainer.checkpoint_callback.last_model_path) == run / "checkpoints" / "last.ckpt"
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert list((run / "csv").rglob("metrics.csv")) and list((run / "tensorboard").rglob("events.out.tfevents.*"))
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["data"]["init_args"]["batch_size"] == 8 and config["trainer"]["max_steps"] == 2
    assert not (tmp_path / "runs" / "lightning_logs").exists()


def test_ckpt_path_last_resumes_in_the_same_folder_and_keeps_earlier_logs(tmp_path: Path) -> None:
    fit("--trainer.max_steps=2")
    resumed = fit("--trainer.max_steps=4", "--ckpt_path=last")  # a longer run: training length applies
    run = tmp_path / "runs" / "simclr_bundled" / "version_0"
    assert resumed.trainer.global_step == 4
    assert sorted(p.name for p in (tmp_path / "runs" / "simclr_bundled").iterdir()) == ["version_0"]
    assert (run / "config.yaml").is_file() and (run / "config-resume-1.yaml").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 2  # not overwritten
    metrics = sorted((run / "csv").rglob("metrics.csv"))
    assert len(metrics) == 2, "the resumed run must not delete the first attempt's metrics"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_a_named_run_with_checkpoints_is_not_overwritten(tmp_path: Path) -> None:
    fit("--trainer.max_steps=1", "--run_name=mine")
    with pytest.raises(RunFolderError, match="already holds checkpoints"):
        fit("--trainer.max_steps=1", "--run_name=mine")


def test_resume_refuses_another_method_and_changed_settings(tmp_path: Path) -> None:
    cli = fit("--trainer.max_steps=1")
    checkpoint = cli.trainer.checkpoint_callback.last_model_path
    byol = [f"--config={CONFIGS / 'byol_bundled.yaml'}", *TINY_SIMCLR[1:5], "--data=SyntheticData",
            "--data.init_args.num_samples=32", "--data.init_args.image_size=16", "--data.init_args.batch_size=8"]
    with pytest.raises(ResumeError, match=r"is a SimCLR checkpoint; the config trains BYOL"):
        run_cli(["fit", *byol, f"--ckpt_path={checkpoint}"])
    with pytest.raises(ResumeError, match=r"temperature: checkpoint 0\.2, given 0\.7"):
        fit(f"--ckpt_path={checkpoint}", "--model.init_args.temperature=0.7")
    with pytest.raises(ResumeError, match=r"has backbone 'cifar_resnet18' \{'base_width': 4\}; the config has 'cifar_resnet34'"):
        fit(f"--ckpt_path={checkpoint}", "--model.init_args.backbone=cifar_resnet34")


def test_a_setting_added_after_the_checkpoint_resumes_at_its_default_only(tmp_path: Path) -> None:
    cli = fit("--trainer.max_steps=1")
    path = Path(cli.trainer.checkpoint_callback.last_model_path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["hyper_parameters"]["activation_checkpointing"]  # as a checkpoint written before the setting
    older = path.with_name("older.ckpt")
    torch.save(checkpoint, older)
    with pytest.raises(ResumeError, match=r"activation_checkpointing: checkpoint '<absent>', given True"):
        fit(f"--ckpt_path={older}", "--model.init_args.activation_checkpointing=true", "--trainer.max_steps=2")
    resumed = fit(f"--ckpt_path={older}", "--trainer.max_steps=2")
    assert resumed.trainer.global_step == 2


def test_wandb_runs_are_named_after_the_config_and_carry_the_whole_config(tmp_path: Path, monkeypatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_overlay = f"--config={CONFIGS / 'logging' / 'wandb.yaml'}"
    ids = set()
    for _ in range(2):
        cli = fit("--trainer.max_steps=1", wandb_overlay)
        run = cli.trainer.loggers[0].experiment
        assert run.name == "simclr_bundled"
        config = dict(run.config)["config"]  # the W&B run config: the whole resolved config
        assert config["data"]["init_args"]["batch_size"] == 8
        assert config["data"]["init_args"]["views"]["size"] == 16
        assert config["trainer"]["max_steps"] == 1
        ids.add(run.id)
        wandb.finish()
    runs = sorted((tmp_path / "runs" / "simclr_bundled").iterdir())
    assert [run.name for run in runs] == ["version_0", "version_1"]
    for run in runs:
        assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # the offline run, in its own run folder
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["model"]["init_args"]["temperature"] == 0.2 and saved["data"]["init_args"]["batch_size"] == 8
    assert len(ids) == 2, "each run folder has its own W&B run id"


def test_logger_false_works_and_still_checkpoints(tmp_path: Path) -> None:
    cli = fit("--trainer.max_steps=1", "--trainer.logger=false")
    assert not cli.trainer.loggers
    assert (tmp_path / "runs" / "simclr_bundled" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_cluster_launchers_name_the_run_folder_so_every_rank_agrees(tmp_path: Path, monkeypatch) -> None:
    from ssl_lightning.cli.run_folder import choose_run_folder

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert choose_run_folder("runs", "simclr", None, "last").path == Path("runs/simclr/slurm-4242")
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert choose_run_folder("runs", "simclr", None, None).path == Path("runs/simclr/torchrun-job7")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(RunFolderError, match="under torchrun pass --run_name"):
        choose_run_folder("runs", "simclr", None, None)
    assert choose_run_folder("runs", "simclr", "mine", None).path == Path("runs/simclr/mine")
