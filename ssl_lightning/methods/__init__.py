"""Self-supervised methods, one LightningModule per file."""

from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.byol import BYOL
from ssl_lightning.methods.moco_v2 import MoCoV2
from ssl_lightning.methods.moco_v3 import MoCoV3
from ssl_lightning.methods.simclr import SimCLR
from ssl_lightning.methods.simsiam import SimSiam

__all__ = ["SSLMethod", "BYOL", "MoCoV2", "MoCoV3", "SimCLR", "SimSiam"]
