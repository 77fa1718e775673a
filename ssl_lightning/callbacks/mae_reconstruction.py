"""Log what a masked autoencoder sees and reconstructs (He et al. 2022, figure 2)."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torchvision.utils import make_grid

from ssl_lightning.callbacks.image_logging import log_image_grid
from ssl_lightning.sharding import is_sharded


class MAEReconstructionLogger(Callback):
    """Every ``every_n_epochs`` training epochs and at the end of training, log a grid with one row per
    sample and four columns: original, masked (hidden patches grey), reconstruction, and reconstruction
    with the visible patches pasted back.

    The samples are the first ``num_images`` views of the run's first training batch and the masks come
    from a generator seeded with ``seed``, so successive grids show the same images under the same masks.
    Needs ``pl_module.reconstruct(images, generator) -> (reconstruction, mask)`` (mask 1 on hidden pixels)
    and the datamodule's ``mean``/``std``. The grid goes to every W&B and TensorBoard logger as
    ``mae_reconstruction`` and to ``mae_reconstruction.png`` in ``trainer.log_dir`` (latest), on rank 0.
    A sharded model (FSDP, ``ssl_lightning.sharding``) gathers its weights collectively, so there every rank
    runs the reconstruction of its own first images and rank 0 logs its grid.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, seed: int = 0) -> None:
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError(f"num_images and every_n_epochs must be positive, got {num_images} and {every_n_epochs}")
        self.num_images, self.every_n_epochs, self.seed = num_images, every_n_epochs, seed
        self._images: Optional[torch.Tensor] = None
        self._log_dir: Optional[str] = None
        self._logged_step: Optional[int] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._log_dir = trainer.log_dir  # a collective under DDP: read it on every rank, here

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._images is None and (trainer.is_global_zero or is_sharded(pl_module)):
            self._images = batch["views"][0][: self.num_images].detach().clone()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._logged_step != trainer.global_step:
            self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logged_step = trainer.global_step
        if not (trainer.is_global_zero or is_sharded(pl_module)) or self._images is None:
            return
        grid = self.grid(pl_module, self._images, trainer.datamodule.mean, trainer.datamodule.std)
        if trainer.is_global_zero:
            log_image_grid(trainer, "mae_reconstruction", grid, self._log_dir)

    @torch.no_grad()
    def grid(self, pl_module: pl.LightningModule, images: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
        """(3, H', W') float grid in [0, 1] on the CPU: per row original, masked, reconstruction, pasted."""
        generator = torch.Generator(device=images.device).manual_seed(self.seed)
        reconstruction, mask = pl_module.reconstruct(images, generator)
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        original = (images.float() * std_t + mean_t).clamp(0, 1)
        reconstruction = (reconstruction.float() * std_t + mean_t).clamp(0, 1)
        masked = original * (1 - mask) + 0.5 * mask
        pasted = original * (1 - mask) + reconstruction * mask
        columns = torch.stack([original, masked, reconstruction, pasted], dim=1).flatten(0, 1)
        return make_grid(columns.cpu(), nrow=4, padding=2)
