"""Weighted kNN against a slow loop reference; feature extraction modes and dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_lightning.scoring import extract_features, knn_accuracy, knn_predict


def reference_knn(query, bank, bank_labels, num_classes, k, temperature):
    """One query at a time: sort cosine similarities, sum exp(sim / T) of the top k per class."""
    scores = torch.zeros(len(query), num_classes, dtype=torch.float64)
    for i, q in enumerate(query.double()):
        sims = [float(q @ b / (q.norm() * b.norm())) for b in bank.double()]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[: min(k, len(sims))]
        for j in order:
            scores[i, int(bank_labels[j])] += math.exp(sims[j] / temperature)
    return scores


@pytest.mark.parametrize("k, chunk_size", [(5, 1024), (7, 3), (1000, 4)])
def test_knn_predict_matches_reference(k: int, chunk_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    query, bank = torch.randn(11, 8, generator=g), 3 * torch.randn(40, 8, generator=g)
    bank_labels = torch.randint(0, 4, (40,), generator=g)
    scores = knn_predict(query, bank, bank_labels, num_classes=4, k=k, temperature=0.2, chunk_size=chunk_size)
    expected = reference_knn(query, bank, bank_labels, 4, k, 0.2)
    assert scores.shape == (11, 4) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [40, 16])
def test_knn_top1_and_top5_match_reference_ranking(k: int) -> None:
    """Top-5: the label is among the 5 classes with the largest reference scores."""
    g = torch.Generator().manual_seed(1)
    query, bank = torch.randn(30, 6, generator=g), torch.randn(40, 6, generator=g)
    bank_labels, query_labels = torch.arange(40) % 8, torch.randint(0, 8, (30,), generator=g)
    expected = reference_knn(query, bank, bank_labels, 8, k, 0.07)
    in_top1, in_top5 = [], []
    for scores, label in zip(expected.tolist(), query_labels.tolist()):
        ranked = sorted(range(8), key=lambda c: -scores[c])
        in_top1.append(ranked[0] == label)
        in_top5.append(label in ranked[:5])
        # a class without votes scores 0: the data is chosen so that no such tie decides a top-5 membership
        assert scores[label] > 0 or sum(s > 0 for s in scores) >= 5
    top1, top5 = knn_accuracy(query, query_labels, bank, bank_labels, 8, k=k, temperature=0.07)
    assert top1 == pytest.approx(100 * sum(in_top1) / 30)
    assert top5 == pytest.approx(100 * sum(in_top5) / 30) and top1 < top5 < 100


def test_knn_top1_is_percent_and_uses_neighbours() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    bank_labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[2.0, 0.1], [0.1, 5.0], [1.0, 0.05], [0.2, 1.0]])
    assert knn_accuracy(query, torch.tensor([0, 1, 0, 1]), bank, bank_labels, 2, k=2, temperature=0.1)[0] == 100.0
    assert knn_accuracy(query, torch.tensor([0, 1, 1, 0]), bank, bank_labels, 2, k=2, temperature=0.1)[0] == 50.0


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.Dropout(0.5))
        self.frozen = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.net(x)).double()


def test_extract_features_eval_mode_no_grad_and_restores_modes() -> None:
    model = Probe().train()
    model.frozen.eval()
    loader = [{"image": torch.randn(4, 2, 3), "label": torch.tensor([0, 1, 2, 0], dtype=torch.int32)} for _ in range(3)]
    features, labels = extract_features(model, loader, "cpu")
    assert features.shape == (12, 3) and features.dtype == torch.float32 and not features.requires_grad
    assert labels.dtype == torch.long and labels.tolist() == [0, 1, 2, 0] * 3
    # eval mode: dropout off, so a second pass gives the same features
    torch.testing.assert_close(extract_features(model, loader, "cpu")[0], features, rtol=0, atol=0)
    assert model.training and model.net.training and not model.frozen.training


def test_extract_features_pads_the_forwards_of_a_short_shard_with_its_last_batch() -> None:
    """``num_forwards``: the extra calls (what a sharded model's ranks need to all-gather together) repeat the last
    batch and add no features; an empty shard cannot join and says so."""
    seen: list[torch.Tensor] = []
    model = nn.Flatten()
    model.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    loader = [{"image": torch.full((2, 3), float(i)), "label": torch.tensor([i, i])} for i in range(2)]
    features, labels = extract_features(model, loader, "cpu", num_forwards=4)
    assert features.shape == (4, 3) and labels.tolist() == [0, 0, 1, 1]
    assert [float(images[0, 0]) for images in seen] == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="share of the evaluation set is empty"):
        extract_features(model, [], "cpu", num_forwards=1)
