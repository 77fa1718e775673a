"""Fine-tuning and pseudo-label refinement on the bundled CIFAR-10 subset, on one GPU (or the CPU).

    PYTHONPATH=. python benchmarks/finetune_gpu_check.py --simclr runs/x/simclr.ckpt --mae runs/x/mae.ckpt [--epochs 30]

The checkpoints are ``ssl-lightning fit`` runs on the bundled data (e.g. configs/simclr_bundled.yaml and
configs/mae_bundled.yaml); they are read without jsonargparse, so the script runs on a bare GPU image.

For a SimCLR checkpoint and the same network at random initialisation: fine-tuning on balanced 1% and 10%
label fractions (SimCLR's recipe, crop + flip, SGD), then pseudo-label refinement from 10%. For an MAE
checkpoint: AdamW fine-tuning with layer-wise lr decay on 10%. Prints one line per run (top-1, top-5, s).
"""

from __future__ import annotations

import argparse
import time

import torch
from lightning.pytorch import seed_everything

from ssl_lightning.backbones import build_backbone
from ssl_lightning.datamodules import BundledCIFAR10
from ssl_lightning.eval.finetune import FineTuneConfig, finetune
from ssl_lightning.eval.label_fractions import label_fraction_indices
from ssl_lightning.eval.pseudo_label import pseudo_label_refinement


def pretrained_backbone(path: str, pretrained: bool = True) -> torch.nn.Module:
    """The backbone of a checkpoint of ``ssl-lightning fit`` (built from its hyper-parameters, without
    jsonargparse), with its weights or, when ``pretrained`` is False, at random initialisation."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    backbone = build_backbone(hparams["backbone"], **(hparams.get("backbone_kwargs") or {}))
    if pretrained:
        state = {k[len("backbone."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
        backbone.load_state_dict(state)
    return backbone


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--simclr", required=True)
    parser.add_argument("--mae", required=True)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--num_workers", type=int, default=8)
    args = parser.parse_args()
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if accelerator == 'gpu' else 'cpu'}, precision {args.precision}")
    trainer_kwargs = dict(accelerator=accelerator, devices=1, precision=args.precision, enable_progress_bar=False)
    data = BundledCIFAR10(batch_size=64, num_workers=args.num_workers, eval_batch_size=500)
    train, _ = data.labeled_sources()
    labels = train.labels
    simclr, random_backbone = pretrained_backbone(args.simclr), pretrained_backbone(args.simclr, pretrained=False)
    sgd = FineTuneConfig(epochs=args.epochs, batch_size=64, lr=0.05)

    def report(name: str, start: float, top1: float, top5: float, extra: str = "") -> None:
        print(f"{name}: top1={top1:.2f} top5={top5:.2f} seconds={time.perf_counter() - start:.1f} {extra}", flush=True)

    for fraction in (0.01, 0.1):
        indices = label_fraction_indices(labels, fraction, seed=0, num_classes=10)
        for init, backbone in (("simclr", simclr), ("random", random_backbone)):
            seed_everything(0, verbose=False)
            start = time.perf_counter()
            result = finetune(backbone, data, indices, sgd, trainer_kwargs=trainer_kwargs)
            report(f"finetune {init} {fraction:.0%} ({len(indices)} labels)", start, result.top1, result.top5)

    seed_everything(0, verbose=False)
    start = time.perf_counter()
    indices = label_fraction_indices(labels, 0.1, seed=0, num_classes=10)
    refined = pseudo_label_refinement(simclr, data, indices, threshold=0.9, config=sgd, trainer_kwargs=trainer_kwargs)
    report("pseudo-label simclr 10% before", start, refined.before.top1, refined.before.top5)
    report("pseudo-label simclr 10% after", start, refined.after.top1, refined.after.top5,
           f"kept {refined.num_kept}/{refined.num_unlabeled} at p>=0.9"
           + (f", {refined.kept_accuracy:.1f}% of them correct" if refined.kept_accuracy is not None else ""))

    mae = pretrained_backbone(args.mae)
    adamw = FineTuneConfig(epochs=args.epochs, batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                           warmup_epochs=min(5, args.epochs // 5), layer_decay=0.75, crop_scale=(0.2, 1.0))
    seed_everything(0, verbose=False)
    start = time.perf_counter()
    result = finetune(mae, data, indices, adamw, trainer_kwargs=trainer_kwargs)
    report("finetune mae 10% layer_decay=0.75", start, result.top1, result.top5)


if __name__ == "__main__":
    main()
