"""Callbacks that work on the state a method exposes (never importing a method)."""

from ssl_lightning.callbacks.knn_monitor import KNNMonitor
from ssl_lightning.callbacks.online_probe import OnlineLinearProbe
from ssl_lightning.callbacks.view_grid import ViewGridLogger

__all__ = ["KNNMonitor", "OnlineLinearProbe", "ViewGridLogger"]
