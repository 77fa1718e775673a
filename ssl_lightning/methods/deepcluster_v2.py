"""DeepCluster-v2 (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
appendix on DeepCluster-v2): at the start of every epoch, spherical k-means on a memory bank of last epoch's
normalized embeddings gives each image a cluster per head of prototypes; the prototypes are set to the centroids,
and every crop learns to predict its image's cluster (cross-entropy of its prototype scores / temperature)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.distributed import gather_no_grad, gather_variable_length, rank, world_size
from ssl_lightning.losses.deepcluster import deepcluster_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead
from ssl_lightning.nn.kmeans import spherical_kmeans
from ssl_lightning.nn.masking import default_mask_seed, step_generator


class DeepClusterV2(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim: the projector (linear, BatchNorm, ReLU, linear: 2048 -> 128), whose
            output is L2-normalized.
        num_prototypes: K of each head (3 heads of 3000 on ImageNet). The prototypes are never trained: k-means
            sets them to its centroids (the official code freezes them for 300,000 iterations, the whole run).
        temperature: of the softmax over prototype scores (0.1).
        kmeans_iterations: rounds of k-means per head and epoch (10).
        crops_for_assign: the crops whose embeddings fill the memory bank (the two global crops); head ``h``
            clusters the bank of crop ``crops_for_assign[h % len(crops_for_assign)]``, as the official code.
        dataset_size: N, the training images (None: taken from the data in ``setup``; it is then written into the
            hyper-parameters, so ``load_from_checkpoint`` builds buffers of the saved size).
        kmeans_seed: the seed of the centroids' initial draw (None: the global seed); the draw of epoch ``e`` and
            head ``h`` depends on (seed, e, h) alone, so every rank and a resumed run draw the same rows.

    State, all buffers saved in checkpoints and the same on every rank: ``memory_bank`` (crops, N, D), row ``i``
    the newest embedding of image ``i``, written after every step with the rows of all ranks; DDP's broadcast of
    rank 0's buffers before each forward skips the bank and the table (``_ddp_params_and_buffers_to_ignore``: 1.3 GB
    per step on ImageNet), which every rank keeps identical itself; ``assignments`` (heads, N),
    the cluster of every image; ``clustered_epoch``, the epoch the assignments were made for, so a run resumed
    mid-epoch keeps them. Images that ``drop_last`` left out of last epoch keep an older embedding.

    First epoch: before any training step the bank is filled by one pass over every training image (the official
    code's ``init_memory``; solo-learn instead trains without targets for one epoch), so epoch 0 already learns
    from the clusters of the initial network. The pass embeds each image once, with the evaluation transform and
    the network in eval mode (every crop's bank gets that embedding), so it does not depend on the batching nor on
    the number of processes; the official code embeds the training crops.
    """

    def __init__(
        self,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        num_prototypes: Sequence[int] = (3000, 3000, 3000),
        temperature: float = 0.1,
        kmeans_iterations: int = 10,
        crops_for_assign: Sequence[int] = (0, 1),
        dataset_size: Optional[int] = None,
        kmeans_seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_prototypes = [int(k) for k in num_prototypes]
        self.crops_for_assign = [int(c) for c in crops_for_assign]
        if not self.num_prototypes or min(self.num_prototypes) < 1 or kmeans_iterations < 1:
            raise ValueError(f"num_prototypes must be positive (one per head) and kmeans_iterations >= 1, got "
                             f"{list(num_prototypes)} and {kmeans_iterations}")
        if not self.crops_for_assign or min(self.crops_for_assign) < 0 or len(set(self.crops_for_assign)) != len(self.crops_for_assign):
            raise ValueError(f"crops_for_assign must be distinct non-negative crop indices, got {list(crops_for_assign)}")
        if dataset_size is not None and dataset_size < 1:
            raise ValueError(f"dataset_size must be positive or None (from the data), got {dataset_size}")
        self.temperature, self.kmeans_iterations = temperature, kmeans_iterations
        self.kmeans_seed = default_mask_seed(kmeans_seed)
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, num_layers=2)
        self.prototypes = nn.ModuleList(nn.Linear(projection_dim, k, bias=False) for k in self.num_prototypes)
        self.prototypes.requires_grad_(False)
        for head in self.prototypes:
            head.weight.copy_(F.normalize(head.weight.detach(), dim=1))
        self._size_buffers(dataset_size or 0)
        self.register_buffer("clustered_epoch", torch.tensor(-1))
        self._ddp_params_and_buffers_to_ignore = ["memory_bank", "assignments"]  # identical on every rank already

    def _size_buffers(self, size: int) -> None:
        device = self.prototypes[0].weight.device
        projection_dim = self.prototypes[0].in_features
        self.register_buffer("memory_bank", torch.zeros(len(self.crops_for_assign), size, projection_dim, device=device))
        self.register_buffer("assignments", torch.full((len(self.num_prototypes), size), -1, device=device))

    def setup(self, stage: str) -> None:
        """Size the bank from the training data (before a checkpoint is restored) and check the settings."""
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        size = getattr(datamodule, "num_train_items", None)
        if size is None:
            raise ValueError(f"DeepClusterV2 trains from an ssl_lightning datamodule (its num_train_items sizes the "
                             f"memory bank, its evaluation loader fills the first one), got {type(datamodule).__name__}")
        if self.hparams.get("dataset_size") not in (None, size):
            raise ValueError(f"DeepClusterV2: dataset_size={self.hparams['dataset_size']} but the training data "
                             f"holds {size} images; set model.init_args.dataset_size: {size} or null (from the data)")
        if max(self.num_prototypes) > size:
            raise ValueError(f"DeepClusterV2: num_prototypes={self.num_prototypes} asks for more clusters than the "
                             f"{size} training images; use at most {size} per head")
        if self.memory_bank.shape[1] != size:
            self._size_buffers(size)
        self.hparams["dataset_size"] = size

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint["state_dict"].get("memory_bank")
        if saved is not None and saved.shape != self.memory_bank.shape:
            raise ValueError(f"DeepClusterV2: the checkpoint's memory bank holds {saved.shape[1]} images, this run's "
                             f"training data {self.memory_bank.shape[1]}; resume on the data it was trained on")

    def on_train_epoch_start(self) -> None:
        """Cluster last epoch's bank, once per epoch: Lightning 2.6 skips this hook when it resumes mid-epoch, and
        ``clustered_epoch`` keeps the saved assignments of a resumed epoch should a version call it again."""
        if int(self.clustered_epoch) == self.current_epoch:
            return
        if int(self.clustered_epoch) < 0:
            self.fill_memory_bank()
        self.cluster_memory_bank()
        self.clustered_epoch.fill_(self.current_epoch)

    @torch.no_grad()
    def cluster_memory_bank(self) -> None:
        """k-means per head over the bank, each rank assigning a slice of its rows; the prototypes become the
        centroids and the assignments of all rows are gathered, so every rank holds the same table."""
        size = self.memory_bank.shape[1]
        mine = torch.tensor_split(torch.arange(size, device=self.memory_bank.device), world_size())[rank()]
        for h, head in enumerate(self.prototypes):
            bank = self.memory_bank[h % len(self.crops_for_assign)]
            generator = step_generator(torch.device("cpu"), self.kmeans_seed, self.current_epoch, h)
            first = torch.randperm(size, generator=generator)[: head.out_features].to(bank.device)
            centroids, assigned = spherical_kmeans(bank[mine], bank[first], self.kmeans_iterations)
            head.weight.copy_(centroids)
            self.assignments[h] = gather_variable_length(assigned)

    @torch.no_grad()
    def fill_memory_bank(self) -> None:
        """The first bank: every training image embedded once (evaluation transform, eval mode), each rank
        embedding every ``world_size``-th image and all ranks writing every row."""
        datamodule = self.trainer.datamodule
        loader = datamodule.eval_loader(datamodule.train_images(), rank(), world_size())
        was_training = self.training
        self.eval()
        indices, embeddings = [], []
        with self.trainer.precision_plugin.val_step_context():
            for batch in loader:
                indices.append(batch["index"].to(self.device))
                embeddings.append(F.normalize(self.projector(self(batch["image"].to(self.device))).float(), dim=1))
        self.train(was_training)
        self.memory_bank[:, gather_variable_length(torch.cat(indices))] = gather_variable_length(torch.cat(embeddings))

    @torch.no_grad()
    def update_memory_bank(self, index: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Write the embeddings (B, crops, D) of this step's images, gathered from every rank, into their rows."""
        self.memory_bank[:, gather_no_grad(index)] = gather_no_grad(embeddings).transpose(0, 1).to(self.memory_bank.dtype)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views, index = batch["views"], batch.get("index")
        if index is None:
            raise ValueError("DeepClusterV2 needs batch['index'] (each image's index in the training set) to look up "
                             "its cluster; use an ssl_lightning datamodule, whose training batches carry it")
        if max(self.crops_for_assign) >= len(views):
            raise ValueError(f"DeepClusterV2: crops_for_assign {self.crops_for_assign} needs more than the "
                             f"{len(views)} views per image")
        features = self.features_by_resolution(views)
        embeddings = F.normalize(self.projector(torch.cat(features)), dim=1)  # one BatchNorm over all crops
        crops = embeddings.chunk(len(views))
        scores = [[head(crop) for crop in crops] for head in self.prototypes]
        loss = deepcluster_loss(scores, self.assignments[:, index], self.temperature)
        self.update_memory_bank(index, torch.stack([crops[c].detach() for c in self.crops_for_assign], dim=1))
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": features[0].detach(), "embeddings": crops[0].detach()}
