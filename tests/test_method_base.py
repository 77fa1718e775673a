"""``SSLMethod.features_by_resolution``: one backbone call per resolution, same features as one call per view."""

from __future__ import annotations

import pytest
import torch

from ssl_lightning.methods import SimCLR


def test_features_by_resolution_matches_one_call_per_view_and_groups_sizes() -> None:
    torch.manual_seed(0)
    method = SimCLR(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}).eval()
    views = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(3)]
    calls: list[tuple[int, ...]] = []
    method.backbone.register_forward_hook(lambda module, args, output: calls.append(tuple(args[0].shape)))
    with torch.no_grad():
        grouped = method.features_by_resolution(views)
        calls_grouped = list(calls)
        single = [method(view) for view in views]
    assert calls_grouped == [(6, 3, 32, 32), (9, 3, 16, 16)]
    assert len(grouped) == len(views)
    for got, expected in zip(grouped, single):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_two_view_methods_reject_multi_crop_batches_with_a_clear_error() -> None:
    method = SimCLR(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4})
    views = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16)]
    with pytest.raises(ValueError, match="num_local: 0 \\(got 3 views\\)"):
        method.training_step({"views": views, "label": torch.zeros(2, dtype=torch.long)}, 0)
