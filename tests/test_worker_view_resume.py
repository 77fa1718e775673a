"""Views made in DataLoader workers are drawn per (seed, epoch, image): a run resumed mid-epoch makes the same views
as an uninterrupted one, also with persistent workers, and views still differ between epochs and between images."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.methods import SimCLR
from ssl_lightning.optim import OptimConfig
from tests.tiny_methods import one_thread  # noqa: F401  (autouse fixture)

TOTAL_STEPS = 8  # two epochs of 32 images in batches of 8


def _data() -> SyntheticData:
    return SyntheticData(num_samples=32, batch_size=8, image_size=16, num_workers=2, seed=0, views_on_device=False)


def _fit(root: Path, ckpt_path: str | None = None) -> SimCLR:
    seed_everything(0, verbose=False)
    model = SimCLR(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, projection_hidden_dim=32,
                   projection_dim=16, optim=OptimConfig(name="sgd", lr=0.5, warmup_epochs=1))
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=TOTAL_STEPS, deterministic=True, logger=False,
                      limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root,
                      callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1,
                                                 filename="{step}")])
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    assert trainer.global_step == TOTAL_STEPS
    return model


@pytest.mark.parametrize("stop_step", [3, 5], ids=["mid-epoch-0", "mid-epoch-1"])
def test_worker_views_resume_bit_identically(stop_step: int, tmp_path: Path) -> None:
    """An odd step: the resumed run deals the rest of the epoch's batches to the 2 workers the other way round."""
    full = _fit(tmp_path / "full")
    resumed = _fit(tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / f"step={stop_step}.ckpt"))
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_persistent_workers_draw_each_epochs_views() -> None:
    data = _data()
    data.setup("fit")
    loader = data.train_dataloader()
    assert loader.persistent_workers
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        epochs.append({int(i): [v[row] for v in batch["views"]] for batch in batches
                       for row, i in enumerate(batch["index"])})
        for batch in batches:  # the same views as the dataset makes in this process for (epoch, index)
            index = int(batch["index"][0])
            expected = loader.dataset[(epoch, index)]["views"]
            assert all(torch.equal(made[0], view) for made, view in zip(batch["views"], expected))
    first, second = epochs
    assert first.keys() == second.keys()
    assert not any(torch.equal(first[i][0], second[i][0]) for i in first), "an image has the same view in both epochs"
    boxes = torch.stack([loader.dataset[(0, i)]["boxes"][0] for i in first])
    assert len(boxes.unique(dim=0)) == len(first), "two images share a crop"
    assert not torch.equal(*first[0][:2]), "an image's two views are the same"
