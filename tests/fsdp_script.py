"""DINO, iBOT and MAE trained under FSDP2 (Lightning's ``ModelParallelStrategy``, ``SSLMethod.configure_model``) on 2 CPU
processes, and the one-process references of ``tests/test_fsdp.py``.

``python -m tests.fsdp_script OUT`` runs, one after the other in one launch (gloo start-up costs 10-30 s):
``dino`` (2 optimizer steps, a full checkpoint after the first, with ``NonFiniteGuard`` and ``AtomicCheckpointIO``;
its end state also as a distributed checkpoint folder),
``dino_resumed`` (the second step again, from that checkpoint), ``dino_ac`` (activation checkpointing on), ``ibot``
(a token-API method: ``backbone.embed``/``encode`` inside ``training_step``, the mask token at the root), ``mae``,
``smoke_<method>`` (one sharded step of each other ViT method: DINOv2, I-JEPA, SimMIM, MSN, AIM, LeJEPA with a
ViT) and ``cli`` (``ssl-lightning fit`` with ``--trainer.strategy`` the sharded strategy, 2 steps of a tiny DINO ViT,
the kNN monitor on unequal numbers of query batches per rank).
Rank 0 saves each run's full state dict (the shards gathered) and its global losses as ``OUT/<run>.pt``.

The views are fixed tensors as in ``tests/ddp_methods.py``: rank ``r`` of ``W`` takes rows ``r*B/W .. (r+1)*B/W``
of each global batch. One optimizer step per epoch (``EpochViews``), so the checkpoint of epoch 0 is mid-run and a
resume restarts at a batch boundary Lightning restores exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from ssl_lightning import sharding
from ssl_lightning.callbacks.nonfinite import NonFiniteGuard
from ssl_lightning.checkpoint_io import AtomicCheckpointIO
from ssl_lightning.losses.ibot import masked_patch_weights
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.dino import DINO
from ssl_lightning.methods.ibot import IBOT
from ssl_lightning.nn.masking import PatchMasks
from ssl_lightning.methods.mae import MAE
from ssl_lightning.nn.masking import step_generator
from ssl_lightning.nn.masking.blockwise import block_masks
from ssl_lightning.optim import OptimConfig

WORLD_SIZE, GLOBAL_BATCH, STEPS = 2, 8, 2
IMAGE_SIZE, LOCAL_SIZE, NUM_LOCAL = 16, 8, 2
# SGD: a step linear in the gradient, large enough that a wrong gradient moves weights far beyond the tolerance
SGD = {"name": "sgd", "lr": 12.8, "weight_decay": 1e-4, "warmup_epochs": 1}
VIT = {"image_size": IMAGE_SIZE, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def build(name: str, activation_checkpointing: bool = False, reference: bool = False) -> SSLMethod:
    """DINO or iBOT (multi-crop, tiny ViT and heads) or MAE (tiny encoder and decoder), seeded: the same weights
    everywhere. ``reference``: the one-process reference of the per-rank masks (``SimulatedRanks*``)."""
    seed_everything(0, verbose=False)
    if name == "dino":  # clip_grad 0.5 so that the per-parameter clipping acts on the sharded gradients
        return DINO(backbone="vit_tiny", backbone_kwargs=VIT, out_dim=32, hidden_dim=32, bottleneck_dim=16,
                    base_momentum=0.9, clip_grad=0.5, freeze_last_layer_epochs=0, optim=OptimConfig(**SGD),
                    activation_checkpointing=activation_checkpointing)
    if name == "ibot":  # separate heads; every global crop masked (at 10-50% of its 4x4 patches)
        return (SimulatedRanksIBOT if reference else IBOT)(
            backbone="vit_tiny", backbone_kwargs=VIT, out_dim=32, patch_out_dim=24, shared_head=False, hidden_dim=32,
            bottleneck_dim=16, mask_probability=1.0, mask_seed=3, base_momentum=0.9, clip_grad=0.5,
            freeze_last_layer_epochs=0, optim=OptimConfig(**SGD), activation_checkpointing=activation_checkpointing)
    if name == "mae":
        return (SimulatedRanksMAE if reference else MAE)(backbone="mae_vit_tiny", backbone_kwargs=VIT, decoder_dim=16, decoder_depth=1, decoder_num_heads=2,
                   mask_seed=3, optim=OptimConfig(**SGD), activation_checkpointing=activation_checkpointing)
    raise ValueError(f"unknown method {name!r}")


class SimulatedRanksMAE(MAE):
    """The one-process reference of MAE under ``WORLD_SIZE`` ranks: each rank's rows are masked with that rank's
    generator (MAE seeds its masks from (seed, rank, step)) and the loss is the mean of the ranks' losses (every
    image hides as many patches, so it is the mean over the full batch)."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views, size = batch["views"], batch["views"][0].shape[0] // WORLD_SIZE
        losses = []
        for rank in range(WORLD_SIZE):
            generator = self._generator(views[0].device, rank, self.trainer.global_step, 0)
            losses.append(self.masked_loss(torch.cat([v[rank * size : (rank + 1) * size] for v in views]), generator)[0])
        loss = torch.stack(losses).mean()
        self.log("train/loss", loss)
        return {"loss": loss}


class SimulatedRanksIBOT(IBOT):
    """iBOT's one-process reference under ``WORLD_SIZE`` ranks: rank ``r``'s global crops (its rows of each crop)
    masked with rank ``r``'s generator, laid out as in the full batch. The patch loss's weights ``1 / (2B n_i)``
    then give the mean of the ranks' losses, and the centers are means over the full batch either way."""

    def draw_masks(self, global_crops: torch.Tensor, batch_idx: int) -> PatchMasks:
        grid, per_rank = self.backbone.grid_size(global_crops), global_crops.shape[0] // WORLD_SIZE
        mask = torch.zeros(self.global_crops, WORLD_SIZE, per_rank // self.global_crops, grid[0] * grid[1], dtype=torch.bool)
        for rank in range(WORLD_SIZE):
            generator = step_generator(torch.device("cpu"), self.mask_seed, rank, self.trainer.global_step, 0)
            ratios = self.draw_mask_ratios(per_rank, generator)
            mask[:, rank] = block_masks(ratios, grid, generator, self.mask_aspect_ratio).view(self.global_crops, -1, grid[0] * grid[1])
        mask = mask.flatten(0, 2)
        rows = mask.flatten().nonzero().squeeze(1)
        return PatchMasks(mask, rows, masked_patch_weights(mask).flatten()[rows])


#: the other ViT methods, run one sharded step each (tiny settings as ``tests/test_resume_every_method.py``):
#: name -> (class name, keyword arguments, number of global views, number of local views)
TINY_VIT = {"backbone": "vit_tiny", "backbone_kwargs": VIT}
NO_CLS = {"backbone": "vit_tiny", "backbone_kwargs": {**VIT, "class_token": False, "global_pool": "avg", "fc_norm": False}}
ADAMW = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.04, "warmup_epochs": 1}
SMOKE: dict[str, tuple[str, dict[str, Any], int, int]] = {
    "dinov2": ("DINOv2", {**TINY_VIT, "backbone_kwargs": {**VIT, "reg_tokens": 1, "init_values": 1e-5}, "out_dim": 32,
                          "patch_out_dim": 24, "hidden_dim": 16, "bottleneck_dim": 8}, 2, 2),
    "ijepa": ("IJEPA", {**NO_CLS, "predictor_dim": 16, "predictor_depth": 1, "predictor_num_heads": 2, "min_context": 2}, 1, 0),
    "simmim": ("SimMIM", {**TINY_VIT, "mask_patch_size": 8}, 1, 0),
    "msn": ("MSN", {**TINY_VIT, "mask_ratio": 0.5, "focal_views": 2, "projection_hidden_dim": 16, "projection_dim": 8,
                    "num_prototypes": 10}, 2, 2),
    "aim": ("AIM", {**NO_CLS, "head_dim": 16, "head_blocks": 1}, 1, 0),
    "lejepa": ("LeJEPA", {**TINY_VIT, "projection_hidden_dim": 16, "projection_dim": 8, "num_slices": 16}, 2, 2),
}


def smoke_model(name: str) -> SSLMethod:
    from ssl_lightning import methods

    seed_everything(0, verbose=False)
    class_name, kwargs, _, _ = SMOKE[name]
    return getattr(methods, class_name)(**kwargs, optim=OptimConfig(**ADAMW))


def smoke_views(name: str) -> list[list[torch.Tensor]]:
    """One step's views of the global batch: the method's global views, then its local ones."""
    _, _, global_views, local_views = SMOKE[name]
    generator = torch.Generator().manual_seed(2)
    sizes = [IMAGE_SIZE] * global_views + [LOCAL_SIZE] * local_views
    return [[torch.randn(GLOBAL_BATCH, 3, size, size, generator=generator) for size in sizes]]


def fixed_views(name: str) -> list[list[torch.Tensor]]:
    """For each step, the views of the global batch (DINO, iBOT: 2 global crops and 2 local ones; MAE: 2 views)."""
    generator = torch.Generator().manual_seed(1)
    sizes = [IMAGE_SIZE] * 2 + ([LOCAL_SIZE] * NUM_LOCAL if name in ("dino", "ibot") else [])
    return [[torch.randn(GLOBAL_BATCH, 3, s, s, generator=generator) for s in sizes] for _ in range(STEPS)]


class _EpochBatch:
    """A training "loader" of one batch: step ``current_epoch``'s views, this rank's rows."""

    def __init__(self, module: "EpochViews") -> None:
        self.module = module

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        trainer, size = self.module.trainer, self.module.batch_size
        rows = slice(trainer.global_rank * size, (trainer.global_rank + 1) * size)
        views = self.module.steps[trainer.current_epoch]
        yield {"views": [view[rows] for view in views], "label": torch.full((size,), -1)}


class EpochViews(LightningDataModule):
    """Fixed views, one optimizer step per epoch; rank ``r`` of ``W`` gets rows ``r*B/W .. (r+1)*B/W``."""

    def __init__(self, steps: list[list[torch.Tensor]], world_size: int) -> None:
        super().__init__()
        self.steps, self.batch_size = steps, GLOBAL_BATCH // world_size
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # read by MAE's image logger

    def train_dataloader(self) -> Any:
        return _EpochBatch(self)

    def val_dataloader(self) -> Any:  # a validation forward (sanity check, epoch ends) leaves the root gathered
        batch = {"image": self.steps[0][0][: self.batch_size], "label": torch.zeros(self.batch_size, dtype=torch.long)}
        return DataLoader([batch], batch_size=None)


class GlobalLoss(Callback):
    """Each step's loss averaged over the ranks (the loss of one process on the full batch)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


def sharded_strategy() -> ModelParallelStrategy:
    """FSDP over both processes; full (rank-0) checkpoints, written by the CheckpointIO (see ``docs``)."""
    return ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1, save_distributed_checkpoint=False)


def train(model: SSLMethod, devices: int, steps: list[list[torch.Tensor]], root_dir: Path,
          ckpt_dir: Optional[Path] = None, ckpt_path: Optional[str] = None, folder: Optional[Path] = None) -> list[float]:
    """``len(steps)`` optimizer steps (one per epoch); sharded on ``devices`` processes when 2. Returns the losses.
    ``root_dir``: the trainer's folder (MAE's image logger writes there without a logger).
    ``folder``: also save the end state as a distributed checkpoint folder there."""
    losses = GlobalLoss()
    callbacks: list[Callback] = [losses, NonFiniteGuard()]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", every_n_epochs=1, save_top_k=-1))
    trainer = Trainer(
        default_root_dir=root_dir, accelerator="cpu", devices=devices, strategy=sharded_strategy() if devices > 1 else "auto",
        max_epochs=len(steps), use_distributed_sampler=False, limit_val_batches=1, logger=False,
        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, plugins=[AtomicCheckpointIO()], num_sanity_val_steps=1,
    )
    trainer.fit(model, EpochViews(steps, devices), ckpt_path=ckpt_path)
    if folder is not None:
        trainer.strategy._save_distributed_checkpoint = True
        trainer.save_checkpoint(folder)
    return losses.losses


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, shards gathered (on every rank), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False))
    return {key: value.detach().clone() for key, value in state.items()}


def cli_args(out: Path) -> list[str]:
    """``ssl-lightning fit``: a tiny DINO ViT on synthetic images, 2 steps, the sharded strategy from the command line."""
    return [
        "fit", f"--config={Path(__file__).resolve().parents[1] / 'configs' / 'dino_bundled.yaml'}",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=bf16-mixed",
        "--trainer.max_steps=2", "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0", "--trainer.enable_model_summary=false", "--trainer.logger=false",
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
        "--trainer.strategy.save_distributed_checkpoint=false",
        f"--runs_root={out / 'cli'}", "--run_name=sharded",  # one folder for both ranks (launched by this script)
        "--model.init_args.backbone=vit_tiny",
        f"--model.init_args.backbone_kwargs={VIT}", "--model.init_args.channels_last=false",
        "--model.init_args.activation_checkpointing=true", "--model.init_args.use_bn_in_head=false",
        "--model.init_args.out_dim=32", "--model.init_args.hidden_dim=32", "--model.init_args.bottleneck_dim=16",
        "--data=SyntheticData", "--data.init_args.num_samples=32", f"--data.init_args.image_size={IMAGE_SIZE}",
        # the kNN monitor's queries: 5 images in batches of 2, so rank 0 runs 2 forwards and rank 1 one
        "--data.init_args.num_val_samples=5", "--data.init_args.eval_batch_size=2",
        "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
        f"--data.init_args.views={{size: {IMAGE_SIZE}, num_local: 2, local_size: {LOCAL_SIZE}}}",
    ]


def main(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    model = build("dino")
    losses = train(model, WORLD_SIZE, fixed_views("dino"), out / "dino", ckpt_dir=out / "dino_ckpt", folder=out / "dino_folder")
    results["dino"] = {"state": full_state(model), "losses": losses}

    model = build("dino")  # resumed from the checkpoint of the first step (epoch 0)
    losses = train(model, WORLD_SIZE, fixed_views("dino"), out / "dino_resumed", ckpt_path=str(out / "dino_ckpt" / "epoch=0.ckpt"))
    results["dino_resumed"] = {"state": full_state(model), "losses": losses}

    model = build("dino", activation_checkpointing=True)
    losses = train(model, WORLD_SIZE, fixed_views("dino"), out / "dino_ac")
    results["dino_ac"] = {"state": full_state(model), "losses": losses}

    for name in ("ibot", "mae"):
        model = build(name)
        losses = train(model, WORLD_SIZE, fixed_views(name), out / name)
        results[name] = {"state": full_state(model), "losses": losses}

    for name in SMOKE:
        model = smoke_model(name)
        results[f"smoke_{name}"] = {"losses": train(model, WORLD_SIZE, smoke_views(name), out / name),
                                    "sharded": sharding.is_sharded(model)}

    if dist.get_rank() == 0:
        for name, result in results.items():
            torch.save(result, out / f"{name}.pt")
    dist.barrier()

    from ssl_lightning.cli import main as cli_main

    cli_main(cli_args(out))
    dist.barrier()  # rank 0 (the launched process) exits after every rank is done


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main(Path(sys.argv[1]))
