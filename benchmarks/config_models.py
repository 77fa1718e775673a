"""Models and view recipes of a config, built by the CLI without training: what the benchmarks run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ssl_lightning.cli.lightning_cli import SSLLightningCLI, run_cli


def placeholder_image_folder(root: Path) -> Path:
    """A 2-class ``train/`` and ``val/`` folder of 4 small JPEGs each: the ImageNet configs' ``ImageFolder`` needs a
    real root to be built; the training data itself is synthetic."""
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(4):
                Image.new("RGB", (64, 64), (index * 60, 100, 200)).save(folder / f"{index}.jpg")
    return root


def build_from_config(config: Path, image_folder_root: Optional[Path] = None) -> SSLLightningCLI:
    """The CLI of ``fit --config config`` built but not run (``cli.model``, ``cli.datamodule.views``); an
    ImageFolder config gets ``image_folder_root`` (e.g. ``placeholder_image_folder``) as its root."""
    root = [] if image_folder_root is None else ["--data.init_args.root", str(image_folder_root)]
    return run_cli(["fit", "--config", str(config), "--trainer.logger", "false", *root], run=False)
