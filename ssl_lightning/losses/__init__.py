"""Loss functions: pure tensor-in, loss-out functions that are correct under DDP."""

from ssl_lightning.losses.nt_xent import nt_xent_logits, nt_xent_loss
from ssl_lightning.losses.dcl import decoupled_contrastive_loss, von_mises_fisher_weights
from ssl_lightning.losses.cosine import fastsiam_loss, negative_cosine_similarity, normalized_mse
from ssl_lightning.losses.supcon import supcon_loss
from ssl_lightning.losses.nnclr import nearest_neighbours, nnclr_loss
from ssl_lightning.losses.deepcluster import deepcluster_loss
from ssl_lightning.losses.tico import TiCoTerms, tico_loss
from ssl_lightning.losses.wmse import whiten, wmse_loss
from ssl_lightning.losses.densecl import dense_contrastive_loss, dense_correspondence
from ssl_lightning.losses.infonce import infonce_queue_loss, moco_v3_contrastive_loss, moco_v3_loss
from ssl_lightning.losses.inpainting import hidden_region_mse
from ssl_lightning.losses.swav import sinkhorn_knopp, swav_loss
from ssl_lightning.losses.dino import dino_loss, teacher_entropy, teacher_temperature, update_center_
from ssl_lightning.losses.barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from ssl_lightning.losses.vicreg import VICRegLoss, vicreg_loss
from ssl_lightning.losses.ibot import cross_view_loss, ibot_patch_loss, masked_patch_weights
from ssl_lightning.losses.koleo import koleo_loss
from ssl_lightning.losses.ijepa import ijepa_loss, layer_normed_targets
from ssl_lightning.losses.simmim import simmim_loss
from ssl_lightning.losses.msn import MSNTerms, msn_loss, msn_targets, power_law_prior, prior_kl, sharpen
from ssl_lightning.losses.aim import aim_loss
from ssl_lightning.losses.sigreg import LeJEPALoss, epps_pulley, lejepa_loss, lejepa_prediction_loss, sigreg, slice_directions

__all__ = [
    "nt_xent_loss",
    "nt_xent_logits",
    "decoupled_contrastive_loss",
    "von_mises_fisher_weights",
    "infonce_queue_loss",
    "moco_v3_contrastive_loss",
    "moco_v3_loss",
    "negative_cosine_similarity",
    "normalized_mse",
    "fastsiam_loss",
    "supcon_loss",
    "nearest_neighbours",
    "nnclr_loss",
    "deepcluster_loss",
    "TiCoTerms",
    "tico_loss",
    "whiten",
    "wmse_loss",
    "dense_contrastive_loss",
    "dense_correspondence",
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
    "cross_view_loss",
    "ibot_patch_loss",
    "masked_patch_weights",
    "koleo_loss",
    "ijepa_loss",
    "layer_normed_targets",
    "simmim_loss",
    "MSNTerms",
    "msn_loss",
    "msn_targets",
    "power_law_prior",
    "prior_kl",
    "sharpen",
    "aim_loss",
    "LeJEPALoss",
    "epps_pulley",
    "lejepa_loss",
    "lejepa_prediction_loss",
    "sigreg",
    "slice_directions",
]
