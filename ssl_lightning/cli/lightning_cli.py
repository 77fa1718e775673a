"""``SSLLightningCLI``: LightningCLI over every method and datamodule, with run folders and checked resumes.

Any method (a ``LightningModule``: every ``SSLMethod``, and the text model) and any datamodule can be named
in a YAML config with ``class_path`` (the short class name is enough for the package's own) and ``init_args``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

# imported so that configs can name their classes by short name (``class_path: SimCLR``)
import ssl_lightning.callbacks  # noqa: F401
import ssl_lightning.datamodules  # noqa: F401
import ssl_lightning.methods  # noqa: F401
from ssl_lightning.cli.errors import ConfigError, describe_parse_error, with_suggestions
from ssl_lightning.cli.resume import check_resume, short_class
from ssl_lightning.cli.safety import SafetySettings, add_safety
from ssl_lightning.cli.run_folder import RUN_DIR_ENV, RunFolder, choose_run_folder, config_title, is_launched_rank, wire_trainer
from ssl_lightning.eval.checkpoint import load_checkpoint_safely

BASE_CONFIG = "base.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def sibling_base_config(args: list[str]) -> list[str]:
    """``base.yaml`` beside the first ``--config`` file that has one, applied as defaults (shared settings live
    once); none when a ``base.yaml`` is given as a ``--config`` itself. An overlay from another folder given first
    (``configs/logging/wandb.yaml``) does not hide the recipe's base."""
    configs = [Path(arg.split("=", 1)[1]) if arg.startswith("--config=") else Path(args[i + 1])
               for i, arg in enumerate(args) if arg.startswith("--config=") or (arg == "--config" and i + 1 < len(args))]
    if any(path.name == BASE_CONFIG for path in configs):
        return []
    return next(([str(path.parent / BASE_CONFIG)] for path in configs if (path.parent / BASE_CONFIG).is_file()), [])


class SaveRunConfig(SaveConfigCallback):
    """Writes the resolved config to the run folder (``config.yaml``; ``config-resume-<N>.yaml`` for each
    resume, never overwriting) and logs it whole to every logger (the W&B run config holds data, batch size,
    views and trainer settings, not only the method's arguments)."""

    def __init__(self, *args: Any, run_dir: Optional[Path] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_dir = run_dir

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.run_dir is None:
            return
        path, resume = self.run_dir / "config.yaml", 0
        while path.exists():
            resume += 1
            path = self.run_dir / f"config-resume-{resume}.yaml"
        self.parser.save(self.config, path, skip_none=False, multifile=False)
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": resolved})


class SSLLightningCLI(LightningCLI):
    """LightningCLI with the package's conventions.

    - ``base.yaml`` beside the first ``--config`` that has one is read first (``configs/base.yaml``).
    - ``fit`` writes everything under one run folder (``ssl_lightning.cli.run_folder``), printed at the start.
    - ``--ckpt_path`` is checked against the config (``ssl_lightning.cli.resume``) instead of silently
      re-applying the checkpoint's hyper-parameters; ``--ckpt_path last`` finds the run's newest checkpoint.
    - Optimizers are each method's own recipe (``model.init_args.optim``): ``auto_configure_optimizers`` is
      off, so a generic ``--optimizer`` cannot silently replace the parameter groups.
    - Abbreviated options are refused (``--trainer.max_epoch`` is not ``--trainer.max_epochs``).
    - ``run=False`` parses and instantiates everything (model, datamodule, trainer, run folder) exactly as
      ``run=True`` does, then stops before the subcommand runs: the classes a config builds, without training.
    """

    def __init__(self, args: list[str], run: bool = True) -> None:
        self.raw_args = args
        self.run_subcommand = run
        self.run: Optional[RunFolder] = None
        base = sibling_base_config(args)
        parser_kwargs: dict[str, Any] = {"allow_abbrev": False, "exit_on_error": False}
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            seed_everything_default=0,
            parser_kwargs={**parser_kwargs, **{c: {**parser_kwargs, "default_config_files": base} for c in SUBCOMMANDS}},
            args=None if args == sys.argv[1:] else args,  # from the console: no "args and argv" warning
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--safety", type=SafetySettings, default=SafetySettings(),
                            help="periodic checkpoints and the divergence guard (ssl_lightning.cli.safety)")
        parser.add_argument("--runs_root", type=str, default="runs", help="folder that holds the run folders")
        parser.add_argument(
            "--run_name", type=Optional[str], default=None,
            help="name of the run folder (default: slurm-<job id> under SLURM, else the next version_<N>)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args``; an error becomes a ``ConfigError`` whose message suggests the closest valid options."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            subcommand = self._subcommand_parsers.get(self.raw_args[0]) if self.raw_args else None
            options = [opt for action in (subcommand or parser)._actions for opt in action.option_strings]
            raise ConfigError(with_suggestions(describe_parse_error(error), options)) from error

    def _parse_ckpt_path(self) -> None:
        """Choose the run folder, resolve ``last``, and check a checkpoint against the config."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path not in (None, "last", "best", "hpc"):
            self.check_checkpoint(ckpt_path)
        if subcommand != "fit":
            return
        title = config_title(self.raw_args, config.model.get("class_path"))
        self.run = choose_run_folder(config.runs_root, title, config.run_name, ckpt_path)
        wire_trainer(config.trainer, self.run)
        add_safety(config.trainer, config.safety, str(self.run.checkpoints))
        if ckpt_path == "last":
            last = sorted(self.run.checkpoints.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
            config.ckpt_path = str(last[-1]) if last else None
            if config.ckpt_path:
                self.check_checkpoint(config.ckpt_path)
        if not is_launched_rank():
            os.environ[RUN_DIR_ENV] = str(self.run.path)
            resuming = f", resuming {config.ckpt_path}" if config.ckpt_path else ""
            fresh = ", no checkpoint yet: starting a new run" if ckpt_path == "last" and not config.ckpt_path else ""
            print(f"ssl-lightning: run folder {self.run.path}{resuming}{fresh}", flush=True)

    def check_checkpoint(self, ckpt_path: str) -> None:
        """Refuse a checkpoint that is not safely loadable or belongs to another method, backbone or setting."""
        config = self.config[self.config.subcommand]
        checkpoint = load_checkpoint_safely(ckpt_path)
        data = config.get("data")
        check_resume(ckpt_path, checkpoint, config.model, short_class(data.class_path) if data else None)

    def before_instantiate_classes(self) -> None:
        if self.run is not None:
            self.save_config_kwargs["run_dir"] = self.run.path

    def _run_subcommand(self, subcommand: str) -> None:
        if self.run_subcommand:
            super()._run_subcommand(subcommand)


def run_cli(args: list[str], run: bool = True) -> SSLLightningCLI:
    """Parse ``args`` and run the subcommand (``fit``, ``validate``, ...); errors are raised, not printed.
    ``run=False``: build the model, datamodule and trainer the subcommand would use, and stop there."""
    return SSLLightningCLI(args, run=run)


if __name__ == "__main__":
    run_cli(sys.argv[1:])
