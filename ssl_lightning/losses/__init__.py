"""Loss functions: pure tensor-in, loss-out functions that are correct under DDP."""

from ssl_lightning.losses.nt_xent import nt_xent_loss

__all__ = ["nt_xent_loss"]
