"""``PretextMethod``: what the classic pretext tasks share (rotation, jigsaw, colorization, inpainting).

Each task trains the backbone on one lightly augmented view per image and a label or target it makes
itself; evaluation (probe, kNN) uses ``forward(images)``, the backbone features of whole images.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch

from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn.decoder import UpsamplingDecoder


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose largest logit is at the label: (N, K), (N,) -> scalar tensor (no host sync)."""
    return (logits.argmax(dim=-1) == labels).float().mean()


class PretextMethod(SSLMethod):
    """Base of the pretext tasks: the single view of a batch, a generator for the task's own random draws
    (tile offsets, permutations, hole positions) and, for pixel-predicting tasks, a decoder from the
    backbone's feature map.

    The generator is seeded per batch from (``PL_GLOBAL_SEED``, global rank, batches drawn so far): draws
    differ across ranks, and the count is saved in checkpoints, so a resumed run draws the same as an
    uninterrupted one.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._task_batches = 0
        self._generator: Optional[torch.Generator] = None

    def single_view(self, batch: dict[str, Any]) -> torch.Tensor:
        views = batch["views"]
        if len(views) != 1:
            raise ValueError(
                f"{type(self).__name__} trains on one view per image; set data.init_args.views.num_views: 1 "
                f"(got {len(views)} views)"
            )
        return views[0]

    def task_generator(self, device: torch.device) -> torch.Generator:
        """A generator on ``device`` for this batch's draws (call once per training batch)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self._generator.manual_seed(hash((seed, self.global_rank, self._task_batches)) & 0x7FFF_FFFF_FFFF_FFFF)
        self._task_batches += 1
        return self._generator

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pretext_task_batches"] = self._task_batches

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._task_batches = int(checkpoint.get("pretext_task_batches", 0))

    def pixel_decoder(self, out_channels: int) -> UpsamplingDecoder:
        """A decoder from ``backbone.feature_map`` back to the input resolution."""
        stride = getattr(self.backbone, "feature_stride", None)
        if not hasattr(self.backbone, "feature_map") or stride is None:
            raise ValueError(
                f"{type(self).__name__} decodes pixels from a spatial feature map; backbone "
                f"{self.hparams.get('backbone')!r} has no feature_map()/feature_stride (use a ResNet)"
            )
        if stride & (stride - 1):
            raise ValueError(f"feature_stride must be a power of two, got {stride}")
        return UpsamplingDecoder(self.backbone.feature_dim, out_channels, int(math.log2(stride)))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's (B, feature_dim, h, w) map; its spatial mean is ``forward``'s feature."""
        return self.backbone.feature_map(self.to_memory_format(images))
