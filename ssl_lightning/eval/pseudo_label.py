"""Pseudo-label refinement for semi-supervised evaluation (Lee 2013, "Pseudo-Label"; the self-training
step of Xie et al. 2020, "Self-training with Noisy Student", and Chen et al. 2020, SimCLRv2, section 2).

1. Fine-tune the pretrained backbone on the few labeled images.
2. Label the remaining training images with that model and keep those whose largest softmax probability
   reaches ``threshold``.
3. Fine-tune again, starting from the *pretrained* weights (not from step 1's model), on the labeled plus
   the kept pseudo-labeled images, and evaluate on the validation split.

Restarting from the pretrained weights, as Noisy Student trains a fresh student, keeps the second model
from inheriting the first one's over-fitting to the few labels: its errors then come only through the
pseudo-labels, which the threshold filters, and both runs use the same recipe and length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from ssl_lightning.datamodules.base import SSLDataModule
from ssl_lightning.eval.finetune import FineTuneConfig, FineTuneResult, finetune, fit_classifier, predict_probabilities


def select_confident(probabilities: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``probabilities (N, C)`` whose largest entry is ``>= threshold``: their row indices and
    their most probable classes (the pseudo-labels)."""
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must have shape (N, C), got {tuple(probabilities.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a probability and must lie in [0, 1], got {threshold}")
    confidence, classes = probabilities.max(dim=1)
    keep = (confidence >= threshold).nonzero().squeeze(1)
    return keep, classes[keep]


class PseudoLabeled(Dataset):
    """Items ``(image, pseudo_label)`` for ``indices`` of a source of ``(image, label)``: the source's
    own label is replaced by ``labels[i]``."""

    def __init__(self, source: Dataset, indices: torch.Tensor, labels: torch.Tensor) -> None:
        if indices.shape != labels.shape or indices.ndim != 1:
            raise ValueError(f"indices and labels must be 1-D of one length, got {tuple(indices.shape)} and {tuple(labels.shape)}")
        self.source, self.indices, self.labels = source, indices.tolist(), labels.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.source[self.indices[index]]
        return image, self.labels[index]


def refinement_set(source: Dataset, labeled: torch.Tensor, kept: torch.Tensor, pseudo_labels: torch.Tensor) -> Dataset:
    """The retraining set: ``labeled`` images of ``source`` with their labels, then ``kept`` ones with
    their pseudo-labels."""
    return ConcatDataset([Subset(source, labeled.tolist()), PseudoLabeled(source, kept, pseudo_labels)])


@dataclass
class PseudoLabelResult:
    """Accuracy before (labeled images only) and after refinement, and what the pseudo-labelling kept.

    ``kept_accuracy`` is the percent of kept pseudo-labels equal to the true label. When no image is kept
    there is no retraining: ``after`` is ``before`` and ``kept_accuracy`` is None.
    """

    before: FineTuneResult
    after: FineTuneResult
    threshold: float
    num_labeled: int
    num_unlabeled: int
    num_kept: int
    kept_accuracy: Optional[float]


def pseudo_label_refinement(
    backbone: nn.Module,
    datamodule: SSLDataModule,
    labeled_indices: torch.Tensor | list[int],
    threshold: float = 0.9,
    config: Optional[FineTuneConfig] = None,
    head_init: Optional[nn.Linear] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
) -> PseudoLabelResult:
    """Fine-tune on ``labeled_indices`` of the labeled training images, pseudo-label the others (their
    true labels are only used to report the pseudo-labels' accuracy), retrain from ``backbone`` on labeled +
    confident images and evaluate both models on the validation split. Both runs use ``config``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a probability and must lie in [0, 1], got {threshold}")
    train, _ = datamodule.labeled_sources()
    eval_train = datamodule.train_eval_dataset()
    if train is None or eval_train is None:
        raise ValueError(f"{type(datamodule).__name__} has no labeled training images to pseudo-label")
    labeled = torch.as_tensor(labeled_indices, dtype=torch.long).unique()
    if labeled.numel() == 0 or labeled[0] < 0 or labeled[-1] >= len(train):  # type: ignore[arg-type]
        raise ValueError(f"labeled_indices must be non-empty indices into the {len(train)} labeled training images")  # type: ignore[arg-type]
    unlabeled_mask = torch.ones(len(train), dtype=torch.bool)  # type: ignore[arg-type]
    unlabeled_mask[labeled] = False
    unlabeled = unlabeled_mask.nonzero().squeeze(1)

    before = finetune(backbone, datamodule, labeled, config, head_init, trainer_kwargs)
    probabilities, true_labels = predict_probabilities(
        before.model, Subset(eval_train, unlabeled.tolist()), datamodule.eval_batch_size, datamodule.num_workers,
        before.trainer.strategy.root_device, before.trainer.precision_plugin,
    )
    before.model.cpu()  # free the device for the second run
    keep, pseudo_labels = select_confident(probabilities, threshold)
    if keep.numel() == 0:  # retraining on the same labels would only repeat the first run with other noise
        return PseudoLabelResult(before, before, threshold, labeled.numel(), unlabeled.numel(), 0, None)
    kept_accuracy = (pseudo_labels == true_labels[keep]).float().mean().item() * 100.0
    after = fit_classifier(
        backbone, refinement_set(train, labeled, unlabeled[keep], pseudo_labels), datamodule, config, head_init, trainer_kwargs
    )
    return PseudoLabelResult(
        before=before, after=after, threshold=threshold, num_labeled=labeled.numel(),
        num_unlabeled=unlabeled.numel(), num_kept=keep.numel(), kept_accuracy=kept_accuracy,
    )
