"""``compile_backbone`` and ``compile_step``: a compiled step gives the loss and gradients of the eager one, under
the same state-dict keys (so checkpoints move between compiled and eager runs); channels-last by default for
convolutional backbones only."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from ssl_lightning.methods import BYOL, MoCoV2, SimCLR
from tests.tiny_methods import BACKBONE, one_thread, tiny_method  # noqa: F401  (one_thread: autouse fixture)


def loss_and_gradients(method: torch.nn.Module, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    method.zero_grad()
    loss = method.training_step({"views": views, "label": torch.full((4,), -1)}, 0)["loss"]
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}


@pytest.mark.slow  # compiling a ResNet's forward and backward takes about a minute on 2 cores
def test_compiled_backbone_step_equals_eager_step() -> None:
    views = list(torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    eager = tiny_method(BYOL)
    compiled = tiny_method(BYOL, compile_backbone=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    eager_loss, eager_grads = loss_and_gradients(eager, views)
    compiled_loss, compiled_grads = loss_and_gradients(compiled, views)
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.slow  # compiling each method's whole step, forward and backward, takes about a minute on 2 cores
@pytest.mark.parametrize("cls", [SimCLR, BYOL, MoCoV2], ids=lambda cls: cls.__name__)
def test_compiled_whole_step_equals_eager_step(cls: type) -> None:
    views = list(torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    eager = tiny_method(cls) if cls is not SimCLR else SimCLR(**BACKBONE, projection_hidden_dim=32, projection_dim=16)
    compiled = (tiny_method(cls, compile_step=True) if cls is not SimCLR
                else SimCLR(**BACKBONE, projection_hidden_dim=32, projection_dim=16, compile_step=True))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    eager_loss, eager_grads = loss_and_gradients(eager, views)
    graphs = counters["stats"]["unique_graphs"]
    compiled_loss, compiled_grads = loss_and_gradients(compiled, views)
    assert counters["stats"]["unique_graphs"] > graphs  # the step did go through torch.compile
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_compile_step_refuses_a_second_compilation_of_the_backbone() -> None:
    with pytest.raises(ValueError, match="compile_step: true already compiles the backbone"):
        SimCLR(**BACKBONE, compile_step=True, compile_backbone=True)


def test_channels_last_is_on_for_convolutional_backbones_only() -> None:
    assert SimCLR(**BACKBONE).channels_last
    assert not SimCLR(**BACKBONE, channels_last=False).channels_last
    vit = {"backbone": "vit_tiny", "backbone_kwargs": {"image_size": 32, "patch_size": 8}}
    assert not SimCLR(**vit).channels_last
