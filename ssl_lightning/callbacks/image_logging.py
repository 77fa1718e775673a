"""Send an image grid to every logger that takes images (W&B, TensorBoard) and to a PNG file."""

from __future__ import annotations

import os
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import save_image


def log_image_grid(trainer: pl.Trainer, key: str, grid: torch.Tensor, log_dir: Optional[str]) -> None:
    """Log ``grid`` (3, H, W) in [0, 1] under ``key``; also write ``<log_dir>/<key>.png`` when there is one."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, trainer.global_step)
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
        save_image(grid, os.path.join(log_dir, f"{key}.png"))
