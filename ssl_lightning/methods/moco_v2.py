"""MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning";
Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive Learning"): a query encoder,
a momentum key encoder, and InfoNCE against a queue of past keys."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from ssl_lightning.callbacks.momentum import MomentumUpdate
from ssl_lightning.callbacks.queue import QueueUpdate
from ssl_lightning.distributed import shuffle_across_ranks, unshuffle_across_ranks
from ssl_lightning.losses import infonce_queue_loss
from ssl_lightning.losses.dcl import ContrastiveLoss, check_contrastive_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class MoCoV2(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim: the MLP head (linear, ReLU, linear: MoCo v2's 2048 -> 128).
        temperature: InfoNCE temperature (0.2 in MoCo v2).
        loss, dclw_sigma: ``nt_xent`` (the paper's InfoNCE), ``dcl`` or ``dclw`` (Yeh et al. 2022: the positive
            left out of the denominator; DCLW also weights it, kernel width ``dclw_sigma``).
        queue_size: negatives kept (65,536 on ImageNet; 4,096 suits small datasets). A multiple of the
            global batch keeps whole batches in the queue, as the paper does.
        momentum: the key encoder's EMA momentum, constant (0.999 on ImageNet; 0.99 on small datasets).
        shuffle_bn: shuffle-BN for the key encoder (sec. 3.3): the keys' BatchNorm statistics come from
            other samples than the queries', so the model cannot cheat through intra-batch statistics.
            It needs several processes (DDP): the global batch is permuted across ranks, every rank
            encodes a slice and the keys go back to their samples; on one process it is a no-op (one
            BatchNorm over the whole batch does not depend on its order). The alternative is SyncBatchNorm
            (``trainer.sync_batchnorm: true`` with ``shuffle_bn: false``; GPU only, it does not run on CPU),
            which computes the statistics over the global batch: prefer it when the per-device batch is
            small (noisy statistics) or gathering the images of every rank costs too much bandwidth;
            shuffle-BN is the paper's choice and adds one all-gather of images and one of keys per step.

    Query ``q`` from view 1 by the query encoder, key ``k`` from view 2 by the key encoder without gradient
    (Algorithm 1). ``MomentumUpdate`` and ``QueueUpdate`` come with the method (``configure_callbacks``).
    """

    def __init__(
        self,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        temperature: float = 0.2,
        loss: ContrastiveLoss = "nt_xent",
        dclw_sigma: float = 0.5,
        queue_size: int = 4096,
        momentum: float = 0.999,
        shuffle_bn: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        check_contrastive_loss(loss, dclw_sigma)
        self.temperature, self.momentum, self.shuffle_bn = temperature, momentum, shuffle_bn
        self.loss_name, self.dclw_sigma = loss, dclw_sigma
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, hidden_bn=False)
        self.key_backbone = self.frozen_copy(self.backbone)
        self.key_projector = self.frozen_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def optimized_modules(self) -> list[torch.nn.Module]:
        return [self.backbone, self.projector]

    def configure_callbacks(self) -> list[Callback]:
        pairs = [("backbone", "key_backbone"), ("projector", "key_projector")]
        return [MomentumUpdate(pairs, base_momentum=self.momentum, schedule="constant"), QueueUpdate()]

    @torch.no_grad()
    def encode_keys(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Normalized keys of ``images`` from the momentum encoder, with shuffle-BN across ranks."""
        unshuffle = None
        if self.shuffle_bn:  # the permutation's seed is shared by all ranks and stable across a resume
            generator = torch.Generator().manual_seed(hash((self.global_step, batch_idx)) & 0x7FFF_FFFF_FFFF_FFFF)
            images, unshuffle = shuffle_across_ranks(images, generator)
        keys = F.normalize(self.key_projector(self.key_backbone(self.to_memory_format(images))), dim=1)
        return unshuffle_across_ranks(keys, unshuffle)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        features = self(view1)
        q = self.projector(features)
        k = self.encode_keys(view2, batch_idx)
        loss = infonce_queue_loss(q, k, self.queue, self.temperature, self.loss_name, self.dclw_sigma)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": features.detach(), "embeddings": q.detach(), "keys": k}
