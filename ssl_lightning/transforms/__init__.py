"""View recipes: per-sample transforms for DataLoader workers and batched transforms for the device."""

from ssl_lightning.transforms.batched import BatchedViews
from ssl_lightning.transforms.simclr import SimCLRViews, eval_transform

__all__ = ["BatchedViews", "SimCLRViews", "eval_transform"]
