"""Log a grid of the first training batch's views, to check the augmentations by eye."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torchvision.utils import make_grid

from ssl_lightning.callbacks.image_logging import log_image_grid


class ViewGridLogger(Callback):
    """On the run's first training batch, log ``num_images`` samples (rows) x their views (columns).

    Views are denormalized with the datamodule's ``mean``/``std``; smaller views (multi-crop) are
    resized to the first view's size. The grid goes to every W&B and TensorBoard logger and to
    ``views.png`` in ``trainer.log_dir``, on rank 0.
    """

    def __init__(self, num_images: int = 8) -> None:
        self.num_images = num_images
        self._log_dir: str | None = None
        self._done = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._log_dir = trainer.log_dir  # a collective under DDP: read it on every rank, here

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._done or trainer.global_step != 0:
            return
        self._done = True
        if not trainer.is_global_zero:
            return
        grid = self._grid(batch["views"], trainer.datamodule.mean, trainer.datamodule.std)
        log_image_grid(trainer, "views", grid, self._log_dir)

    @torch.no_grad()
    def _grid(self, views: list[torch.Tensor], mean: Any, std: Any) -> torch.Tensor:
        """A (3, H, W) float grid in [0, 1] on the CPU: row i holds every view of sample i."""
        size = views[0].shape[-2:]
        n = min(self.num_images, views[0].shape[0])
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        shown = []
        for view in views:
            view = view[:n].detach().float().cpu()
            if view.shape[-2:] != size:
                view = F.interpolate(view, size=size, mode="bilinear", align_corners=False)
            shown.append((view * std_t + mean_t).clamp(0, 1))
        images = torch.stack(shown, dim=1).flatten(0, 1)  # sample-major: s0v0, s0v1, ..., s1v0, ...
        return make_grid(images, nrow=len(views), padding=2)
