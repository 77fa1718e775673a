"""Heads shared by the methods."""

from ssl_lightning.nn.heads import MLPHead
from ssl_lightning.nn.dino_head import DINOHead

__all__ = ["MLPHead", "DINOHead"]
