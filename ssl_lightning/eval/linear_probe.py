"""Linear evaluation of frozen features (the protocol of Chen et al. 2020 / He et al. 2020): a linear
classifier trained on cached backbone features, standardized like a BatchNorm without affine parameters
(as MAE's linear probe, He et al. 2022, appendix A.2), with the learning rate and weight decay chosen on a
held-out part of the training split and the classifier then retrained on the whole training split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.scoring.metrics import topk_accuracy

BN_EPS = 1e-5  # added to the variance, as nn.BatchNorm1d


@dataclass
class LinearProbeResult:
    """Accuracies (percent) on the validation split and the chosen hyper-parameters.

    ``head`` maps *raw* backbone features to logits: the standardization is folded into its weights, so it
    can initialise the classification head of a fine-tuned network. ``sweep`` holds the held-out top-1 of
    every ``(lr, weight_decay)`` tried (empty when the grid has one point).
    """

    top1: float
    top5: float
    lr: float
    weight_decay: float
    head: nn.Linear
    sweep: dict[tuple[float, float], float] = field(default_factory=dict)


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (fit, held-out): ``max(1, round(fraction * n_c))`` images of each class with
    ``n_c >= 2`` images are held out, chosen by a generator seeded with ``seed``. Both are sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    held = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        if members.numel() >= 2:
            count = min(members.numel() - 1, max(1, round(fraction * members.numel())))
            held.append(members[torch.randperm(members.numel(), generator=generator)[:count]])
    if not held:
        raise ValueError("the learning-rate sweep needs a class with at least 2 training images to hold one out")
    held_idx = torch.cat(held).sort().values
    keep = torch.ones(labels.numel(), dtype=torch.bool)
    keep[held_idx] = False
    return keep.nonzero().squeeze(1), held_idx


def train_linear_grid(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> list[nn.Linear]:
    """Softmax regressions on standardized ``features (N, D)``, one per ``(lrs[i], weight_decays[i])``,
    trained side by side on the same batches (one batched matmul per step, so a sweep costs about one run).

    Each is what ``torch.optim.SGD(momentum=0.9, weight_decay=wd)`` with a cosine learning-rate schedule
    (``CosineAnnealingLR``, no warm-up) gives from zero weights after ``epochs`` shuffled passes (order from
    ``seed``). Returns ``nn.Linear`` heads on *raw* features (standardization folded in), on the features'
    device, without gradient.
    """
    if len(lrs) != len(weight_decays) or not lrs:
        raise ValueError(f"need one weight decay per learning rate, got {len(lrs)} lrs and {len(weight_decays)}")
    mean = features.mean(dim=0)
    std = (features.var(dim=0, unbiased=False) + BN_EPS).sqrt()
    inputs, labels = (features - mean) / std, labels.to(features.device)
    count, dim, device = len(lrs), features.shape[1], features.device
    lr = torch.tensor(lrs, dtype=features.dtype, device=device)
    decay = torch.tensor(weight_decays, dtype=features.dtype, device=device)
    params = [torch.zeros(count, dim, num_classes, device=device, requires_grad=True),
              torch.zeros(count, num_classes, device=device, requires_grad=True)]
    momenta = [torch.zeros_like(p) for p in params]
    steps_per_epoch = math.ceil(len(inputs) / batch_size)
    total, step = epochs * steps_per_epoch, 0
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(inputs), generator=generator).to(device).split(batch_size):
            (weight, bias), x, y = params, inputs[idx], labels[idx]
            with torch.enable_grad():
                logits = torch.einsum("bd,hdc->bhc", x, weight) + bias  # (B, heads, C): one matmul
                # summed over the heads: each head's gradient is that of its own mean cross-entropy
                loss = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(count), reduction="sum") / len(y)
                grads = torch.autograd.grad(loss, params)
            factor = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            with torch.no_grad():
                for p, g, m in zip(params, grads, momenta):
                    per_head = (-1,) + (1,) * (p.ndim - 1)  # a head's lr and decay broadcast over its parameters
                    m.mul_(0.9).add_(g + decay.view(per_head) * p)  # zero-initialised: SGD's first-step copy
                    p.sub_(factor.view(per_head) * m)
            step += 1
    heads = []
    for weight, bias in zip(*(p.detach() for p in params)):
        head = nn.Linear(dim, num_classes).to(device).requires_grad_(False)
        head.weight.copy_(weight.T / std)  # W (x - mean) / std + b == (W / std) x + (b - (W / std) mean)
        head.bias.copy_(bias - head.weight @ mean)
        heads.append(head)
    return heads


def train_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lr: float,
    weight_decay: float = 0.0,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> nn.Linear:
    """One head of :func:`train_linear_grid`."""
    return train_linear_grid(features, labels, num_classes, [lr], [weight_decay], epochs, batch_size, seed)[0]


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
    weight_decays: Sequence[float] = (0.0, 1e-4),
    epochs: int = 100,
    batch_size: int = 256,
    holdout_fraction: float = 0.1,
    seed: int = 0,
) -> LinearProbeResult:
    """Sweep ``lrs x weight_decays`` on a stratified held-out part of the training split (see
    :func:`stratified_holdout`), keep the best held-out top-1 (the first in grid order on ties), retrain on
    the whole training split and report top-1/top-5 on the validation split."""
    if train_features.ndim != 2 or val_features.ndim != 2 or train_features.shape[1] != val_features.shape[1]:
        raise ValueError(
            f"expected features (N, D) and (M, D), got {tuple(train_features.shape)} and {tuple(val_features.shape)}"
        )
    for name, labels in (("train_labels", train_labels), ("val_labels", val_labels)):
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise ValueError(f"{name} must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    if not lrs or not weight_decays:
        raise ValueError("lrs and weight_decays must each hold at least one value")
    fit = dict(num_classes=num_classes, epochs=epochs, batch_size=batch_size, seed=seed)
    grid = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    sweep: dict[tuple[float, float], float] = {}
    if len(grid) > 1:
        fit_idx, held_idx = stratified_holdout(train_labels, holdout_fraction, seed)
        fit_idx, held_idx = fit_idx.to(train_features.device), held_idx.to(train_features.device)
        heads = train_linear_grid(train_features[fit_idx], train_labels[fit_idx], lrs=[lr for lr, _ in grid],
                                  weight_decays=[wd for _, wd in grid], **fit)
        for point, head in zip(grid, heads):
            sweep[point] = topk_accuracy(head(train_features[held_idx]), train_labels[held_idx], 1)
    lr, wd = max(grid, key=lambda point: sweep.get(point, 0.0))
    head = train_linear(train_features, train_labels, lr=lr, weight_decay=wd, **fit)
    with torch.no_grad():
        scores = head(val_features)
    return LinearProbeResult(
        topk_accuracy(scores, val_labels, 1), topk_accuracy(scores, val_labels, 5), lr, wd, head, sweep
    )
