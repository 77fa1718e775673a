"""Exact resume for every method: a run stopped mid-epoch and resumed from its checkpoint in a fresh Trainer,
model and datamodule ends bit-identical to an uninterrupted run (weights, targets, queues, centers, prototypes,
optimizer, schedule, datamodule and training-loader position, online probe), also with gradient accumulation.

The methods are found in ``ssl_lightning.methods.__all__``: a new method fails here until it has a tiny recipe."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import ssl_lightning.methods as methods
from ssl_lightning.callbacks import OnlineLinearProbe
from ssl_lightning.datamodules import SyntheticData, TextData
from ssl_lightning.methods import SSLMethod
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews
from tests.test_mlm import CORPUS
from tests.tiny_methods import BACKBONE, HEADS, one_thread  # noqa: F401 (autouse fixture)

PROJECTOR = {"projection_hidden_dim": 32, "projection_dim": 16}
VIT = {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
ONE_VIEW = SimCLRViews(16, num_views=1)
MULTI_CROP = SimCLRViews(16, num_local=2, local_size=8)
SGD = OptimConfig(name="sgd", lr=0.5, warmup_epochs=1)
ADAMW = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=1)

#: method -> (its keyword arguments, the views of its data; None: text). Each recipe switches on the state
#: that must survive a checkpoint: queues, targets, centers, frozen prototypes, task generators, dropout.
RECIPES: dict[str, tuple[dict[str, Any], SimCLRViews | None]] = {
    "SimCLR": ({**BACKBONE, **PROJECTOR, "optim": OptimConfig(name="lars", lr=0.5, warmup_epochs=1)}, None),
    "BYOL": ({**BACKBONE, **HEADS[methods.BYOL], "optim": SGD}, None),
    "MoCoV2": ({**BACKBONE, **HEADS[methods.MoCoV2], "optim": SGD}, None),
    "MoCoV3": ({**BACKBONE, **HEADS[methods.MoCoV3], "optim": SGD}, None),
    "SimSiam": ({**BACKBONE, **HEADS[methods.SimSiam], "optim": SGD}, None),
    "DINO": ({**BACKBONE, "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "final_weight_decay": 0.4,
              "warmup_teacher_temperature_epochs": 2, "optim": OptimConfig(name="adamw", lr=1e-2, weight_decay=0.04)},
             MULTI_CROP),
    "MAE": ({"backbone": "mae_vit_tiny", "backbone_kwargs": VIT, "decoder_dim": 16, "decoder_depth": 1,
             "decoder_num_heads": 2, "optim": ADAMW}, ONE_VIEW),
    "MaskedLanguageModel": ({"dim": 16, "depth": 1, "num_heads": 2, "dropout": 0.1, "optim": ADAMW}, None),
    "Rotation": ({**BACKBONE, "optim": SGD}, ONE_VIEW),
    "Jigsaw": ({**BACKBONE, "head_hidden_dim": 32, "num_permutations": 10, "optim": SGD}, ONE_VIEW),
    "Colorization": ({**BACKBONE, "optim": SGD}, ONE_VIEW),
    "Inpainting": ({**BACKBONE, "mask": "random_boxes", "hole_fraction": 0.25, "optim": SGD}, ONE_VIEW),
    "SwAV": ({**BACKBONE, **PROJECTOR, "num_prototypes": 10, "freeze_prototypes_steps": 1, "queue_length": 16,
              "queue_start_epoch": 1, "optim": SGD}, MULTI_CROP),
    "BarlowTwins": ({**BACKBONE, **PROJECTOR, "optim": SGD}, None),
    "VICReg": ({**BACKBONE, **PROJECTOR, "optim": SGD}, None),
    "VICRegL": ({**BACKBONE, **PROJECTOR, "local_projection_hidden_dim": 16, "local_projection_dim": 8,
                 "location_matches": (3, 1), "optim": SGD}, MULTI_CROP),
    "IBOT": ({"backbone": "vit_tiny", "backbone_kwargs": VIT, "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8,
              "shared_head": False, "final_weight_decay": 0.4, "warmup_teacher_temperature_epochs": 2,
              "optim": OptimConfig(name="adamw", lr=1e-2, weight_decay=0.04)}, MULTI_CROP),
    "DINOv2": ({"backbone": "vit_tiny", "backbone_kwargs": {**VIT, "reg_tokens": 1, "init_values": 1e-5},
                "out_dim": 32, "patch_out_dim": 24, "hidden_dim": 16, "bottleneck_dim": 8, "final_weight_decay": 0.4,
                "warmup_teacher_temperature_epochs": 2,
                "optim": OptimConfig(name="adamw", lr=1e-3, weight_decay=0.04, warmup_epochs=1, layer_decay=0.9)},
               MULTI_CROP),
    "IJEPA": ({"backbone": "vit_tiny", "backbone_kwargs": {**VIT, "class_token": False, "global_pool": "avg", "fc_norm": False},
               "predictor_dim": 16, "predictor_depth": 1, "predictor_num_heads": 2, "min_context": 2,
               "final_weight_decay": 0.4, "optim": ADAMW}, ONE_VIEW),
    "SimMIM": ({"backbone": "vit_tiny", "backbone_kwargs": VIT, "mask_patch_size": 8, "optim": ADAMW}, ONE_VIEW),
    "MSN": ({"backbone": "vit_tiny", "backbone_kwargs": VIT, "mask_ratio": 0.5, "focal_views": 2,
             "projection_hidden_dim": 16, "projection_dim": 8, "num_prototypes": 10, "final_weight_decay": 0.4,
             "optim": OptimConfig(name="adamw", lr=1e-2, weight_decay=0.04)}, MULTI_CROP),
    "AIM": ({"backbone": "vit_tiny", "backbone_kwargs": {**VIT, "class_token": False, "global_pool": "avg", "fc_norm": False},
             "head_dim": 16, "head_blocks": 1, "optim": ADAMW}, ONE_VIEW),
    "LeJEPA": ({**BACKBONE, **PROJECTOR, "num_slices": 16, "optim": SGD}, MULTI_CROP),
    "FastSiam": ({**BACKBONE, **HEADS[methods.SimSiam], "num_views": 3, "optim": SGD}, SimCLRViews(16, num_views=3)),
    "SupCon": ({**BACKBONE, **PROJECTOR, "optim": SGD}, None),
    "DenseCL": ({**BACKBONE, **HEADS[methods.MoCoV2], "dense_hidden_dim": 16, "optim": SGD}, None),
    "WMSE": ({**BACKBONE, "projection_hidden_dim": 32, "projection_dim": 4, "whitening_size": 8, "optim": SGD}, None),
    "TiCo": ({**BACKBONE, **PROJECTOR, "optim": SGD}, None),
    "NNCLR": ({**BACKBONE, **PROJECTOR, "prediction_hidden_dim": 16, "queue_size": 16, "optim": SGD}, None),
    "DeepClusterV2": ({**BACKBONE, **PROJECTOR, "num_prototypes": [4, 6], "kmeans_iterations": 3, "optim": SGD},
                      MULTI_CROP),
}
TEXT_METHODS = {"MaskedLanguageModel"}


def every_method() -> list[type[LightningModule]]:
    """Every concrete LightningModule that ``ssl_lightning.methods`` exports."""
    found = [getattr(methods, name) for name in methods.__all__]
    return [cls for cls in found if inspect.isclass(cls) and issubclass(cls, LightningModule) and cls is not SSLMethod]


def test_every_exported_method_has_a_tiny_recipe() -> None:
    missing = sorted({cls.__name__ for cls in every_method()} - set(RECIPES))
    assert not missing, f"add a tiny recipe to RECIPES in {__file__} for: {', '.join(missing)}"
    assert len(every_method()) >= 15


def _data(name: str, root: Path) -> LightningDataModule:
    views = RECIPES[name][1]
    if name in TEXT_METHODS:
        corpus = root.parent / "corpus.txt"
        corpus.write_text(CORPUS[: len(CORPUS) // 10])
        return TextData(files=str(corpus), vocab_size=300, max_length=16, batch_size=4, cache_dir=str(root.parent / "tok"))
    extra = {} if views is None else {"views": views}
    return SyntheticData(num_samples=32, batch_size=8, image_size=16, num_workers=0, seed=0, **extra)


def _fit(cls: type[LightningModule], root: Path, max_steps: int, accumulate: int, save_every: int,
         ckpt_path: str | None = None) -> tuple[LightningModule, LightningDataModule, Trainer, OnlineLinearProbe | None]:
    """A fresh model, datamodule and trainer (with the online probe on image data) run to ``max_steps``."""
    seed_everything(0, verbose=False)
    model = cls(**RECIPES[cls.__name__][0])
    data = _data(cls.__name__, root)
    probe = None if cls.__name__ in TEXT_METHODS else OnlineLinearProbe()
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=root, every_n_train_steps=save_every, save_top_k=-1,
                                                 filename="{step}")]
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                      deterministic=True, logger=False, limit_val_batches=0, num_sanity_val_steps=0,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                      callbacks=callbacks + ([probe] if probe else []))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, data, trainer, probe


def assert_same(expected: Any, actual: Any, where: str) -> None:
    """Bit-identical: tensors by ``torch.equal`` (and dtype), containers element by element, the rest by ``==``."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and expected.dtype == actual.dtype, where
        assert torch.equal(expected, actual), f"{where} differs (max |diff| {(expected.double() - actual.double()).abs().max()})"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), f"{where}: keys {expected.keys()} vs {actual.keys()}"
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(expected) == len(actual), where
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{where}[{i}]")
    elif isinstance(expected, Callable):  # type: ignore[arg-type]  (a schedule's lambda: rebuilt, not saved)
        pass
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


def _training_state(model: LightningModule, data: LightningDataModule, trainer: Trainer,
                    probe: OnlineLinearProbe | None) -> dict[str, Any]:
    state = {
        "model": model.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
        "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
        "datamodule": data.state_dict(),
        "loader": trainer.train_dataloader.state_dict(),  # the training order and the position in it
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
    }
    if probe is not None:
        state["probe"] = {"head": probe.head.state_dict(), "optimizer": probe.optimizer.state_dict()}
    return state


@pytest.mark.parametrize("accumulate", [1, 2], ids=["no-accumulation", "accumulate-2"])
@pytest.mark.parametrize("cls", every_method(), ids=lambda cls: cls.__name__)
def test_resume_mid_epoch_is_bit_identical(cls: type[LightningModule], accumulate: int, tmp_path: Path) -> None:
    if cls.__name__ not in RECIPES:
        pytest.fail(f"{cls.__name__} has no tiny recipe in RECIPES ({__file__})")
    probe_data = _data(cls.__name__, tmp_path / "probe")
    probe_data.setup("fit")
    batches = len(probe_data.train_dataloader())
    assert batches >= 4, f"{cls.__name__}: {batches} batches per epoch"
    steps_per_epoch = -(-batches // accumulate)  # Lightning steps on the last batch of an epoch too
    stop, total = steps_per_epoch // 2, steps_per_epoch + 1  # stop mid-epoch 0; the resumed run enters epoch 1

    full = _fit(cls, tmp_path / "full", total, accumulate, save_every=stop)
    assert full[2].global_step == total
    checkpoint = tmp_path / "full" / f"step={stop}.ckpt"
    assert torch.load(checkpoint, weights_only=False)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"][
        "ready"] == stop * accumulate, "the checkpoint is not mid-epoch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit(cls, tmp_path / "resumed", total, accumulate, save_every=stop, ckpt_path=str(checkpoint))
    assert not [w for w in caught if "not resumable" in str(w.message)]

    expected, actual = _training_state(*full), _training_state(*resumed)
    assert any(v.is_floating_point() for v in expected["model"].values())
    assert expected["optimizers"][0]["state"], "the optimizer has no state to compare"
    assert_same(expected, actual, cls.__name__)
