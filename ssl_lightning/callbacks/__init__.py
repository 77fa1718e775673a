"""Callbacks that work on the state a method exposes (never importing a method)."""

from ssl_lightning.callbacks.collapse import CollapseMonitor
from ssl_lightning.callbacks.knn_monitor import KNNMonitor
from ssl_lightning.callbacks.momentum import MomentumUpdate
from ssl_lightning.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from ssl_lightning.callbacks.online_probe import OnlineLinearProbe
from ssl_lightning.callbacks.periodic_checkpoint import PeriodicCheckpoint
from ssl_lightning.callbacks.preemption import PreemptionCheckpoint
from ssl_lightning.callbacks.progress import LogFriendlyProgressBar
from ssl_lightning.callbacks.queue import QueueUpdate
from ssl_lightning.callbacks.view_grid import ViewGridLogger

__all__ = ["CollapseMonitor", "KNNMonitor", "MomentumUpdate", "NonFiniteError", "NonFiniteGuard", "OnlineLinearProbe", "PeriodicCheckpoint", "PreemptionCheckpoint", "LogFriendlyProgressBar", "QueueUpdate", "ViewGridLogger"]
