"""Heads shared by the methods."""

from ssl_lightning.nn.heads import AIMHead, DenseProjectionHead, MLPHead
from ssl_lightning.nn.dino_head import DINOHead
from ssl_lightning.nn.predictor import JEPAPredictor

__all__ = ["MLPHead", "AIMHead", "DenseProjectionHead", "DINOHead", "JEPAPredictor"]
