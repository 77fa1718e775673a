"""Heads shared by the methods."""

from ssl_lightning.nn.heads import MLPHead

__all__ = ["MLPHead"]
