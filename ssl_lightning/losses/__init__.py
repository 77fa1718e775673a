"""Loss functions: pure tensor-in, loss-out functions that are correct under DDP."""

from ssl_lightning.losses.nt_xent import nt_xent_loss
from ssl_lightning.losses.cosine import negative_cosine_similarity, normalized_mse
from ssl_lightning.losses.infonce import infonce_queue_loss, moco_v3_contrastive_loss, moco_v3_loss
from ssl_lightning.losses.inpainting import hidden_region_mse
from ssl_lightning.losses.swav import sinkhorn_knopp, swav_loss
from ssl_lightning.losses.dino import dino_loss, teacher_entropy, teacher_temperature, update_center_
from ssl_lightning.losses.barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from ssl_lightning.losses.vicreg import VICRegLoss, vicreg_loss

__all__ = [
    "nt_xent_loss",
    "infonce_queue_loss",
    "moco_v3_contrastive_loss",
    "moco_v3_loss",
    "negative_cosine_similarity",
    "normalized_mse",
    "hidden_region_mse",
    "sinkhorn_knopp",
    "swav_loss",
    "dino_loss",
    "update_center_",
    "teacher_entropy",
    "teacher_temperature",
    "BarlowTwinsLoss",
    "barlow_twins_loss",
    "VICRegLoss",
    "vicreg_loss",
]
