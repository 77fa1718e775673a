"""Shared test set-up: no network, W&B never contacts a server, small thread count."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # tiny test models: thread start-up costs more than it saves


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _close_wandb_runs():
    """A W&B run left open by one test would be reused by the next test's WandbLogger."""
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()
