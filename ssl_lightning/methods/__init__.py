"""Self-supervised methods, one LightningModule per file."""

from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.simclr import SimCLR
from ssl_lightning.methods.byol import BYOL
from ssl_lightning.methods.moco_v2 import MoCoV2
from ssl_lightning.methods.moco_v3 import MoCoV3
from ssl_lightning.methods.simsiam import SimSiam
from ssl_lightning.methods.dino import DINO
from ssl_lightning.methods.mae import MAE
from ssl_lightning.methods.mlm import MaskedLanguageModel
from ssl_lightning.methods.rotation import Rotation
from ssl_lightning.methods.jigsaw import Jigsaw
from ssl_lightning.methods.colorization import Colorization
from ssl_lightning.methods.inpainting import Inpainting
from ssl_lightning.methods.swav import SwAV
from ssl_lightning.methods.barlow_twins import BarlowTwins
from ssl_lightning.methods.vicreg import VICReg
from ssl_lightning.methods.ibot import IBOT
from ssl_lightning.methods.dinov2 import DINOv2
from ssl_lightning.methods.ijepa import IJEPA
from ssl_lightning.methods.simmim import SimMIM
from ssl_lightning.methods.msn import MSN
from ssl_lightning.methods.aim import AIM
from ssl_lightning.methods.lejepa import LeJEPA
from ssl_lightning.methods.fastsiam import FastSiam
from ssl_lightning.methods.supcon import SupCon
from ssl_lightning.methods.nnclr import NNCLR
from ssl_lightning.methods.tico import TiCo
from ssl_lightning.methods.wmse import WMSE
from ssl_lightning.methods.densecl import DenseCL
from ssl_lightning.methods.deepcluster_v2 import DeepClusterV2
from ssl_lightning.methods.vicregl import VICRegL

__all__ = [
    "SSLMethod",
    "SimCLR",
    "BYOL",
    "MoCoV2",
    "MoCoV3",
    "SimSiam",
    "DINO",
    "MAE",
    "MaskedLanguageModel",
    "Rotation",
    "Jigsaw",
    "Colorization",
    "Inpainting",
    "SwAV",
    "BarlowTwins",
    "VICReg",
    "IBOT",
    "DINOv2",
    "IJEPA",
    "SimMIM",
    "MSN",
    "AIM",
    "LeJEPA",
    "FastSiam",
    "SupCon",
    "NNCLR",
    "TiCo",
    "WMSE",
    "DenseCL",
    "DeepClusterV2",
    "VICRegL",
]
