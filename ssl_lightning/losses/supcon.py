"""The supervised contrastive loss (Khosla et al. 2020, "Supervised Contrastive Learning", eq. 2, L^sup_out):
NT-Xent whose positives are every other view of the same class, the supervised baseline of SSL comparisons."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import gather_no_grad
from ssl_lightning.losses.nt_xent import nt_xent_logits


def supcon_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``mean_i -1/|P(i)| sum_{p in P(i)} log( exp(z_i . z_p / t) / sum_{a in A(i)} exp(z_i . z_a / t) )`` over the
    2n local anchors (both views of each image), where A(i) is every other view of the global batch and P(i) those
    of i's class (its own other view among them, so P(i) is never empty). Embeddings and labels are gathered
    from all ranks in rank order (embeddings with gradient), so a DDP run gives one process's loss and
    gradients on the full batch. ``labels``: (n,) class indices >= 0 (``check_labelled`` checks them on the host:
    a check here would wait for the device at every step)."""
    if labels.shape != (z1.shape[0],):
        raise ValueError(f"supcon_loss expects one label per image, got labels of shape {tuple(labels.shape)} for {z1.shape[0]} images")
    logits, _ = nt_xent_logits(z1, z2, temperature)  # (2n, 2N), an anchor against itself at -inf
    every_label = gather_no_grad(labels)
    positives = torch.cat([labels, labels])[:, None] == torch.cat([every_label, every_label])[None, :]
    positives &= torch.isfinite(logits)  # not the anchor itself
    log_probability = torch.where(positives, F.log_softmax(logits, dim=1), torch.zeros_like(logits))
    return (-log_probability.sum(dim=1) / positives.sum(dim=1)).mean()


def check_labelled(labels: torch.Tensor) -> None:
    """One line unless every image has a class label (>= 0); call it on the host copy of the labels."""
    if bool((labels < 0).any()):
        raise ValueError("supcon_loss needs a class label for every image; the batch has unlabelled images (label -1)")
