"""Self-supervised methods, one LightningModule per file."""

from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.simclr import SimCLR

__all__ = ["SSLMethod", "SimCLR"]
