"""One folder per run: ``<runs_root>/<config name>/<run name>`` holds the run's config, checkpoints and logs.

The run name is ``--run_name`` when given, ``slurm-<job id>`` under SLURM (a requeued job keeps its id, so
it continues in its folder), ``torchrun-<rdzv id>`` under torchrun, else the next free ``version_<N>``. ``--ckpt_path last`` resumes the newest
run of the config (or the named one); a checkpoint inside a run folder continues in that folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace

RUN_DIR_ENV = "SSL_LIGHTNING_RUN_DIR"  # rank 0's choice, inherited by the ranks Lightning launches
CHECKPOINTS = "checkpoints"


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (it would mix or overwrite another run's work)."""


@dataclass
class RunFolder:
    path: Path
    title: str  # the config's name, e.g. ``simclr_bundled`` (also the W&B run name)
    resumed: bool

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS


def config_title(args: list[str], model_class_path: Optional[str]) -> str:
    """The stem of the first ``--config`` file, else the method's class name in lower case."""
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return Path(args[i + 1]).stem
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]).stem
    return (model_class_path or "run").rsplit(".", 1)[-1].lower()


def is_launched_rank() -> bool:
    """A process other than the first one (Lightning's launched ranks, torchrun or SLURM ranks > 0)."""
    return any(int(os.environ.get(name, "0") or 0) > 0 for name in ("LOCAL_RANK", "RANK", "SLURM_PROCID", "NODE_RANK"))


def slurm_run_name() -> Optional[str]:
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"slurm-{array_job}_{task}"
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else None


def torchrun_run_name() -> Optional[str]:
    """``torchrun-<rdzv id>`` under torchrun with ``--rdzv-id``; without one the ranks cannot agree on a name."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    if run_id == "none":
        raise RunFolderError("under torchrun pass --run_name (or torchrun --rdzv-id) so that all ranks write to one run folder")
    return f"torchrun-{run_id}"


def has_checkpoints(run: Path) -> bool:
    return any((run / CHECKPOINTS).glob("*.ckpt"))


def newest_run_with_checkpoints(config_root: Path) -> Optional[Path]:
    runs = [run for run in config_root.iterdir() if run.is_dir() and has_checkpoints(run)] if config_root.is_dir() else []
    newest = lambda run: max(p.stat().st_mtime for p in (run / CHECKPOINTS).glob("*.ckpt"))  # noqa: E731
    return max(runs, key=newest) if runs else None


def claim_next_version(config_root: Path) -> Path:
    """Create and return the next free ``version_<N>`` folder (mkdir is the claim: two runs never share one)."""
    config_root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.split("_", 1)[1]) for p in config_root.glob("version_*") if p.name.split("_", 1)[1].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        candidate = config_root / f"version_{version}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            version += 1


def choose_run_folder(runs_root: str, title: str, run_name: Optional[str], ckpt_path: Optional[str]) -> RunFolder:
    """The folder this run writes to (created), following the rules in the module docstring."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and is_launched_rank():
        return RunFolder(Path(inherited), title, resumed=ckpt_path is not None)
    config_root = Path(runs_root) / title
    name = run_name or slurm_run_name() or torchrun_run_name()
    if ckpt_path == "last":
        run = config_root / name if name else newest_run_with_checkpoints(config_root)
        if run is not None:
            run.mkdir(parents=True, exist_ok=True)
            return RunFolder(run, title, resumed=has_checkpoints(run))
        return RunFolder(claim_next_version(config_root), title, resumed=False)
    if ckpt_path is not None and name is None:
        checkpoint = Path(ckpt_path).resolve()
        if checkpoint.parent.name == CHECKPOINTS and (checkpoint.parent.parent / "config.yaml").is_file():
            return RunFolder(checkpoint.parent.parent, title, resumed=True)
    if name is None:
        return RunFolder(claim_next_version(config_root), title, resumed=ckpt_path is not None)
    run = config_root / name
    if has_checkpoints(run) and ckpt_path is None:
        raise RunFolderError(
            f"run folder {run} already holds checkpoints: resume it with --ckpt_path last, or choose another --run_name"
        )
    run.mkdir(parents=True, exist_ok=True)
    return RunFolder(run, title, resumed=ckpt_path is not None)


CHECKPOINT_CALLBACKS = ("ModelCheckpoint", "PeriodicCheckpoint")
LOGGER_FOLDERS = {"CSVLogger": "csv", "TensorBoardLogger": "tensorboard"}


def as_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def class_name(component: Any) -> str:
    return str(getattr(component, "class_path", "")).rsplit(".", 1)[-1]


def wandb_run_id(run: RunFolder) -> str:
    """The W&B id of this run folder, made once and kept in ``wandb_id`` so a resumed run continues it."""
    path = run.path / "wandb_id"
    if not path.is_file():
        path.write_text(f"{run.title}-{os.urandom(4).hex()}\n")
    return path.read_text().strip()


def wire_trainer(trainer: Namespace, run: RunFolder) -> None:
    """Point the trainer, its loggers and its checkpoint callbacks at ``run``'s folder (config edited in place).

    CSV and TensorBoard write under ``csv/`` and ``tensorboard/`` (a new ``version_<N>`` inside each after a
    resume, so earlier logs are kept); W&B runs are named after the config and resumed by id; checkpoints go to
    ``checkpoints/``. Without a logger (``--trainer.logger false``) the learning-rate monitor is left out.
    """
    trainer.default_root_dir = str(run.path)
    loggers = as_list(trainer.get("logger"))
    for logger in loggers:
        args = logger.get("init_args") or Namespace()
        name = class_name(logger)
        args.save_dir = str(run.path)
        if name in LOGGER_FOLDERS:
            args.name = LOGGER_FOLDERS[name]
        elif name == "WandbLogger":
            if args.get("name") in (None, "lightning_logs"):  # WandbLogger's default name: use the config's
                args.name = run.title
            if not is_launched_rank():
                args.id = args.get("id") or wandb_run_id(run)
            args.resume = "allow"
        logger.init_args = args
    callbacks = as_list(trainer.get("callbacks"))
    for callback in callbacks:
        if class_name(callback) in CHECKPOINT_CALLBACKS:
            args = callback.get("init_args") or Namespace()
            if not args.get("dirpath"):
                args.dirpath = str(run.checkpoints)
            callback.init_args = args
    if trainer.get("logger") is False or trainer.get("logger") == []:
        trainer.callbacks = [c for c in callbacks if class_name(c) != "LearningRateMonitor"]
