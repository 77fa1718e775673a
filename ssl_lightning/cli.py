"""``ssl-lightning``: LightningCLI over every method and datamodule of the package.

Any method (a ``LightningModule``: every ``SSLMethod``, and the text model) and any datamodule can be named
in a YAML config with ``class_path`` (the short class name is enough for the package's own) and ``init_args``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

# imported so that configs can name their classes by short name (``class_path: SimCLR``)
import ssl_lightning.callbacks  # noqa: F401
import ssl_lightning.datamodules  # noqa: F401
import ssl_lightning.methods  # noqa: F401


BASE_CONFIG = "base.yaml"


def sibling_base_config(args: list[str]) -> list[str]:
    """``base.yaml`` beside the first ``--config`` file, applied as defaults (shared settings live once)."""
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            path = Path(args[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        else:
            continue
        base = path.parent / BASE_CONFIG
        return [str(base)] if base.is_file() and path.name != BASE_CONFIG else []
    return []


def run_cli(args: Optional[list[str]] = None) -> LightningCLI:
    """Parse ``args`` (default: the command line) and run the subcommand (``fit``, ``validate``, ...).

    A config file in a folder that holds ``base.yaml`` (as ``configs/`` does) gets that file as defaults:
    ``ssl-lightning fit --config configs/simclr_bundled.yaml`` reads ``configs/base.yaml`` first.

    Optimizers are each method's own recipe (``model.init_args.optim``): ``auto_configure_optimizers`` is
    off, so a generic ``--optimizer`` cannot silently replace the parameter groups (no weight decay on
    norms, LARS exclusions).
    """
    base = sibling_base_config(sys.argv[1:] if args is None else args)
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_kwargs={command: {"default_config_files": base} for command in ("fit", "validate", "test", "predict")},
        args=args,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point ``ssl-lightning``."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["eval"]:
        from ssl_lightning.eval.command import main as eval_main

        eval_main(argv[1:])
        return
    if argv[:1] == ["export"]:
        from ssl_lightning.eval.export import main as export_main

        export_main(argv[1:])
        return
    run_cli(args)


if __name__ == "__main__":
    main()
