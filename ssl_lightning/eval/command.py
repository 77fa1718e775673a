"""``ssl-lightning eval``: evaluate the backbone of a checkpoint of any image method.

    ssl-lightning eval --config configs/eval/bundled.yaml --checkpoint runs/.../last.ckpt --output_dir runs/eval/simclr

Features (``method(images)``: the backbone's) of the labeled training split (``train_eval_dataset()``) and of
the validation split (``val_dataset()``) are extracted once and cached on disk (``eval.cache``); the
protocols then run on them: weighted kNN, a linear probe with a swept learning rate, and both on balanced
label fractions (semi-supervised). Two protocols train the whole network on the images instead, on those
fractions: ``finetune`` and ``pseudo_label`` (fine-tune, pseudo-label the confident rest, retrain).
``metrics.json`` and ``report.md`` are written to ``output_dir``.

Images are normalized with the checkpoint's training statistics unless ``--mean``/``--std`` say otherwise;
the datamodule's ``eval_resize``/``eval_crop`` set their size (``eval_resize: none`` keeps native-size images
pixel for pixel). ``--random_init true`` scores the same architecture with untrained weights from ``--seed``.

A protocol is a function ``EvalContext -> list[Result]`` registered in ``PROTOCOLS`` with an optional
dataclass of its settings (parsed as ``--<name>.<field>``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule, seed_everything
from lightning.pytorch.loggers import Logger

import ssl_lightning.datamodules  # noqa: F401  (configs name datamodules by short name)
from ssl_lightning.datamodules import SSLDataModule
from ssl_lightning.eval.cache import FeatureCache, feature_cache_key, file_sha256
from ssl_lightning.eval.checkpoint import load_checkpoint_safely, load_method, training_normalization, untrained_method
from ssl_lightning.scoring import extract_features
from ssl_lightning.eval.finetune import FineTuneConfig, finetune
from ssl_lightning.scoring import knn_accuracy
from ssl_lightning.eval.label_fractions import images_per_class, label_fraction_indices
from ssl_lightning.eval.linear_probe import LinearProbeResult, linear_probe
from ssl_lightning.eval.plots import write_eval_plots
from ssl_lightning.eval.pseudo_label import pseudo_label_refinement
from ssl_lightning.methods import SSLMethod


@dataclass
class KNNOptions:
    """Weighted kNN on cosine similarity (Wu et al. 2018): ``--knn.k``, ``--knn.temperature``."""

    k: list[int] = field(default_factory=lambda: [10, 20, 200])
    temperature: float = 0.07


@dataclass
class LinearOptions:
    """Linear probe on standardized features; the grid ``lrs x weight_decays`` is swept on a held-out part
    (``holdout_fraction``, stratified, from the seed) of the training split."""

    lrs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 1e-4])
    epochs: int = 100
    batch_size: int = 256
    holdout_fraction: float = 0.1


@dataclass
class Result:
    """One row of the report: ``name`` is also the key in ``metrics.json``; ``details`` are extra numbers."""

    name: str
    top1: float
    top5: float
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class EvalContext:
    """What a protocol gets: the method (on ``device``), the set-up datamodule, the parsed options, and
    ``features(split)`` (``"train"`` or ``"val"``), extracted once per run and cached on disk.

    ``artifacts`` passes objects between protocols (``"linear"``: the ``LinearProbeResult``).
    """

    method: SSLMethod
    datamodule: SSLDataModule
    options: Namespace
    device: torch.device
    output_dir: Path
    cache: FeatureCache
    checkpoint_sha256: str
    data_config: dict[str, Any]  # what makes the features besides the checkpoint (the cache key)
    artifacts: dict[str, Any] = field(default_factory=dict)
    _features: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.datamodule.num_classes)  # type: ignore[arg-type]

    def dataset(self, split: str):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        dm = self.datamodule
        return dm.train_eval_dataset() if split == "train" else dm.val_dataset()

    def features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (N, D) float32, labels (N,) long)`` of ``split`` on ``device``, rows in dataset order
        (so indices into them, e.g. a label fraction, are indices into ``dataset(split)`` too)."""
        if split not in self._features:
            dataset = self.dataset(split)
            config = {**self.data_config, "resolved_seed": self.datamodule.seed, "num_images": len(dataset)}
            key = feature_cache_key(self.checkpoint_sha256, config, split)
            start = time.perf_counter()

            def compute() -> tuple[torch.Tensor, torch.Tensor]:
                return extract_features(self.method, self.datamodule.eval_loader(dataset), self.device)

            weights = "untrained weights of checkpoint" if self.options.random_init else "checkpoint"
            (x, y), hit = self.cache.get(key, compute, description=f"{split} features, {weights} {self.checkpoint_sha256}")
            how = "read from" if hit else "extracted into"
            print(f"{split}: {len(y)} features of dim {x.shape[1]} {how} {self.cache.path(key)} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            self._features[split] = (x.to(self.device), y.to(self.device))
        return self._features[split]


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def knn_results(ctx: EvalContext, bank: tuple[torch.Tensor, torch.Tensor], prefix: str = "") -> list[Result]:
    """kNN of the validation features against ``bank`` for every ``k`` of ``--knn.k``."""
    (val_x, val_y), options = ctx.features("val"), ctx.options.knn
    results = []
    for k in options.k:
        top1, top5 = knn_accuracy(val_x, val_y, *bank, ctx.num_classes, k, options.temperature)
        used = min(k, len(bank[1]))
        results.append(Result(f"{prefix}knn/k={k}", top1, top5, {"k": used, "temperature": options.temperature},
                               f"cosine, T={options.temperature:g}" + (f", k clipped to {used}" if used != k else "")))
    return results


def linear_result(
    ctx: EvalContext, train: tuple[torch.Tensor, torch.Tensor], name: str
) -> tuple[Result, LinearProbeResult]:
    """Linear probe trained on ``train`` (features, labels) with ``--linear.*``, evaluated on the validation split."""
    options = ctx.options.linear
    probe = linear_probe(*train, *ctx.features("val"), ctx.num_classes, options.lrs, options.weight_decays,
                         options.epochs, options.batch_size, options.holdout_fraction, ctx.options.seed)
    sweep = {f"lr={lr:g},wd={wd:g}": acc for (lr, wd), acc in probe.sweep.items()}
    details = {"lr": probe.lr, "weight_decay": probe.weight_decay, "heldout_top1": sweep}
    return Result(name, probe.top1, probe.top5, details, f"lr {probe.lr:g}, wd {probe.weight_decay:g}"), probe


def run_knn(ctx: EvalContext) -> list[Result]:
    return knn_results(ctx, ctx.features("train"))


def run_linear(ctx: EvalContext) -> list[Result]:
    result, ctx.artifacts["linear"] = linear_result(ctx, ctx.features("train"), "linear")
    return [result]


def run_fractions(ctx: EvalContext) -> list[Result]:
    """Linear probe and kNN trained on balanced label fractions of the training split, same validation split."""
    train_x, train_y = ctx.features("train")
    results = []
    for fraction in ctx.options.label_fractions:
        idx = label_fraction_indices(train_y, fraction, ctx.options.seed, ctx.num_classes).to(train_x.device)
        subset = (train_x[idx], train_y[idx])
        per_class = images_per_class(len(train_y), ctx.num_classes, fraction)
        labels = f"{len(idx)} labels ({per_class}/class, seed {ctx.options.seed})"
        linear, ctx.artifacts[f"{percent(fraction)}/linear"] = linear_result(ctx, subset, f"{percent(fraction)}/linear")
        linear.note = f"{labels}, {linear.note}"
        results.append(linear)
        for row in knn_results(ctx, subset, prefix=f"{percent(fraction)}/"):
            row.note = f"{labels}, {row.note}"
            results.append(row)
    return results


@dataclass
class FinetuneOptions(FineTuneConfig):
    """Whole-network fine-tuning (``eval.finetune``, SimCLR's semi-supervised recipe by default) on each
    ``--label_fractions`` subset, and on all labels with ``all_labels``; ``--finetune.*`` also sets the
    recipe of ``pseudo_label``. ``head_from_probe`` starts the head from a linear probe trained on the same
    labels (reused from ``linear``/``fractions`` when they ran first). Runs on ``--device`` at ``precision``."""

    head_from_probe: bool = False
    all_labels: bool = False
    precision: str = "32-true"


@dataclass
class PseudoLabelOptions:
    """Pseudo-label refinement (``eval.pseudo_label``) from each ``--label_fractions`` subset: images of the
    rest of the training split predicted with probability >= ``threshold`` join the labeled ones."""

    threshold: float = 0.9


def labeled_subsets(ctx: EvalContext, all_labels: bool = False) -> list[tuple[str, Optional[torch.Tensor]]]:
    """``(name prefix, indices into the training split or None for all)`` per label fraction (and all labels)."""
    train_y = ctx.features("train")[1].cpu()
    subsets: list[tuple[str, Optional[torch.Tensor]]] = [
        (f"{percent(f)}/", label_fraction_indices(train_y, f, ctx.options.seed, ctx.num_classes))
        for f in ctx.options.label_fractions
    ]
    return subsets + ([("", None)] if all_labels else [])


def probe_head(ctx: EvalContext, prefix: str, indices: Optional[torch.Tensor]) -> torch.nn.Linear:
    """The head of the linear probe trained on the same labels (``prefix + "linear"``), trained if absent."""
    key = f"{prefix}linear"
    if key not in ctx.artifacts:
        train_x, train_y = ctx.features("train")
        subset = (train_x, train_y) if indices is None else (train_x[indices.to(ctx.device)], train_y[indices.to(ctx.device)])
        _, ctx.artifacts[key] = linear_result(ctx, subset, key)
    return ctx.artifacts[key].head


def finetune_args(ctx: EvalContext, prefix: str, indices: Optional[torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments shared by ``finetune`` and ``pseudo_label_refinement`` (seeded per subset)."""
    seed_everything(ctx.options.seed, workers=True, verbose=False)
    options: FinetuneOptions = ctx.options.finetune
    gpu = ctx.device.type == "cuda"
    trainer_kwargs = dict(accelerator="gpu" if gpu else "cpu", devices=[ctx.device.index or 0] if gpu else 1,
                          precision=options.precision, enable_progress_bar=False)
    head = probe_head(ctx, prefix, indices) if options.head_from_probe else None
    return dict(config=options, head_init=head, trainer_kwargs=trainer_kwargs)


def finetune_note(options: FinetuneOptions, num_train: int) -> str:
    note = f"{num_train} images, {options.optimizer} lr {options.lr:g}/256, {options.epochs} epochs"
    note += f", layer decay {options.layer_decay:g}" if options.layer_decay is not None else ""
    return note + (", head from the probe" if options.head_from_probe else "")


def run_finetune(ctx: EvalContext) -> list[Result]:
    """Fine-tune the whole network on each labeled subset, evaluate on the validation split."""
    options, results = ctx.options.finetune, []
    for prefix, indices in labeled_subsets(ctx, options.all_labels):
        tuned = finetune(ctx.method.backbone, ctx.datamodule, indices, **finetune_args(ctx, prefix, indices))
        details = {"num_train": tuned.num_train, "epochs": options.epochs, "optimizer": options.optimizer,
                   "lr": options.lr, "layer_decay": options.layer_decay, "head_from_probe": options.head_from_probe}
        results.append(Result(f"{prefix}finetune", tuned.top1, tuned.top5, details, finetune_note(options, tuned.num_train)))
    return results


def run_pseudo_label(ctx: EvalContext) -> list[Result]:
    """Fine-tune on each label fraction, pseudo-label the confident rest, retrain from the pretrained weights."""
    threshold, results = ctx.options.pseudo_label.threshold, []
    for prefix, indices in labeled_subsets(ctx):
        out = pseudo_label_refinement(ctx.method.backbone, ctx.datamodule, indices, threshold,
                                      **finetune_args(ctx, prefix, indices))
        kept = f"kept {out.num_kept}/{out.num_unlabeled} at p>={threshold:g}"
        kept += f" ({out.kept_accuracy:.1f}% correct)" if out.kept_accuracy is not None else ""
        details = {"threshold": threshold, "num_labeled": out.num_labeled, "num_unlabeled": out.num_unlabeled,
                   "num_kept": out.num_kept, "kept_accuracy": out.kept_accuracy}
        results += [
            Result(f"{prefix}pseudo_label/before", out.before.top1, out.before.top5, {"num_train": out.before.num_train},
                   finetune_note(ctx.options.finetune, out.before.num_train)),
            Result(f"{prefix}pseudo_label/after", out.after.top1, out.after.top5, details,
                   f"{kept}; " + (f"retrained from the pretrained weights on {out.after.num_train} images"
                                  if out.num_kept else "nothing to retrain on (the 'before' model)")),
        ]
    return results


@dataclass(frozen=True)
class Protocol:
    run: Callable[[EvalContext], list[Result]]
    options: Optional[type] = None  # a dataclass, parsed as --<protocol name>.<field>


PROTOCOLS: dict[str, Protocol] = {
    "knn": Protocol(run_knn, KNNOptions),
    "linear": Protocol(run_linear, LinearOptions),
    "fractions": Protocol(run_fractions),
    "finetune": Protocol(run_finetune, FinetuneOptions),
    "pseudo_label": Protocol(run_pseudo_label, PseudoLabelOptions),
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ssl-lightning eval", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_argument("--checkpoint", type=str, required=True, help="a checkpoint of `ssl-lightning fit`")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True,
                                  help="the labeled datamodule, named as in training configs (class_path, init_args)")
    parser.add_argument("--output_dir", type=Optional[str], default=None,
                        help="where metrics.json and report.md go (default runs/eval/<Method>-<checkpoint sha256[:8]>, "
                             "with -random_init appended under --random_init)")
    parser.add_argument("--protocols", type=list[str], default=["knn", "linear", "fractions"],
                        help=f"protocols to run, in order; known: {', '.join(PROTOCOLS)}")
    parser.add_argument("--label_fractions", type=list[float], default=[0.01, 0.1],
                        help="fractions of the training labels for the semi-supervised protocols (balanced per class)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the label fractions, held-out split and probe")
    parser.add_argument("--cache_dir", type=str, default="runs/eval/cache", help="where extracted features are cached")
    parser.add_argument("--device", type=str, default="auto", help="'auto' (cuda if available), 'cpu', 'cuda:1', ...")
    parser.add_argument("--plots", type=bool, default=False,
                        help="write plots/tsne.png (and umap.png with umap-learn) of the validation features and "
                             "plots/confusion.png of the linear probe's validation predictions (if it ran)")
    parser.add_subclass_arguments(Logger, "logger", required=False,
                                  help="a Lightning logger (e.g. TensorBoardLogger, WandbLogger) that also receives the "
                                       "metrics and the plots")
    parser.add_argument("--mean", type=Optional[list[float]], default=None,
                        help="per-channel mean normalizing the images (default: the checkpoint's training data's)")
    parser.add_argument("--std", type=Optional[list[float]], default=None,
                        help="per-channel std normalizing the images (default: the checkpoint's training data's)")
    parser.add_argument("--random_init", type=bool, default=False,
                        help="evaluate the checkpoint's architecture with untrained weights drawn from --seed instead "
                             "of its trained ones (the random-initialization baseline)")
    parser.add_argument("--unsafe_load", type=bool, default=False,
                        help="load the checkpoint with weights_only=False (arbitrary pickles: trusted files only)")
    for name, protocol in PROTOCOLS.items():
        if protocol.options is not None:
            parser.add_class_arguments(protocol.options, name)
    return parser


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def labeled_datamodule(datamodule: LightningDataModule) -> SSLDataModule:
    """``datamodule`` set up, after checking it has images, labels and a validation split."""
    name = type(datamodule).__name__
    if not isinstance(datamodule, SSLDataModule):
        raise ValueError(f"{name} is not an image datamodule (SSLDataModule): evaluation needs labeled images")
    datamodule.setup("validate")
    if datamodule.num_classes is None or datamodule.train_eval_dataset() is None or datamodule.val_dataset() is None:
        raise ValueError(f"{name} has no labels or no validation split: evaluation needs a labeled datamodule")
    return datamodule


NORMALIZATION_SOURCES = {"option": "the command line", "checkpoint": "the checkpoint's training data",
                         "datamodule": "the evaluation datamodule's defaults: the checkpoint records no training statistics"}


def resolve_normalization(options: Namespace, datamodule: LightningDataModule,
                          checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``{"mean", "std", "mean_from", "std_from"}``: each of ``--mean``/``--std`` if given, else the training
    data's (saved in the checkpoint), else the evaluation datamodule's; ``*_from`` is a key of
    ``NORMALIZATION_SOURCES``."""
    trained = training_normalization(checkpoint)
    out: dict[str, Any] = {}
    for name in ("mean", "std"):
        given = getattr(options, name)
        if given is not None:
            value, source = given, "option"
        elif trained is not None:
            value, source = trained[name], "checkpoint"
        else:
            value, source = getattr(datamodule, name), "datamodule"
        value = [float(v) for v in value]
        if len(value) != 3 or (name == "std" and min(value) <= 0):
            raise ValueError(f"--{name} must be 3 numbers (one per RGB channel){', all > 0' if name == 'std' else ''}, "
                             f"got {value} from {NORMALIZATION_SOURCES[source]}")
        out[name], out[f"{name}_from"] = value, source
    return out


def evaluate(options: Namespace) -> dict[str, Any]:
    """Run ``options.protocols`` on the checkpoint; write ``metrics.json`` and ``report.md``; return the metrics."""
    unknown = [p for p in options.protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; known: {list(PROTOCOLS)}")
    weights_only = not options.unsafe_load
    if options.random_init:
        method = untrained_method(options.checkpoint, options.seed, weights_only)
    else:
        method = load_method(options.checkpoint, weights_only)
    data_config = options.data.as_dict()
    options = build_parser().instantiate(options)  # the datamodule and the protocols' option dataclasses
    normalization = resolve_normalization(options, options.data, load_checkpoint_safely(options.checkpoint, weights_only))
    options.data.mean, options.data.std = tuple(normalization["mean"]), tuple(normalization["std"])
    data_config = {**data_config, "normalization": normalization["mean"] + normalization["std"]}
    if options.random_init:
        data_config["random_init_seed"] = options.seed
    datamodule = labeled_datamodule(options.data)
    device = resolve_device(options.device)
    sha256 = file_sha256(options.checkpoint)
    suffix = "-random_init" if options.random_init else ""
    output_dir = Path(options.output_dir or f"runs/eval/{type(method).__name__}-{sha256[:8]}{suffix}")
    ctx = EvalContext(method.to(device), datamodule, options, device, output_dir, FeatureCache(options.cache_dir),
                      sha256, data_config)
    results = [row for name in options.protocols for row in PROTOCOLS[name].run(ctx)]
    metrics = {
        "checkpoint": str(options.checkpoint),
        "checkpoint_sha256": sha256,
        "method": type(method).__name__,
        "datamodule": type(datamodule).__name__,
        "num_classes": ctx.num_classes,
        "num_train": len(ctx.dataset("train")),
        "num_val": len(ctx.dataset("val")),
        "feature_dim": int(ctx.features("val")[0].shape[1]),
        "seed": options.seed,
        "random_init": options.random_init,
        "normalization": normalization,
        "eval_images": {"resize": datamodule.eval_resize, "crop": datamodule.eval_crop},
        "results": {r.name: {"top1": r.top1, "top5": r.top5, **r.details} for r in results},
    }
    if options.plots:
        metrics["plots"] = [str(path) for path in plots(ctx, options.logger)]
    if options.logger is not None:
        log_metrics(options.logger, metrics)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report = markdown_report(metrics, results)
    (output_dir / "report.md").write_text(report)
    print(report, f"\nwritten to {output_dir}/metrics.json and {output_dir}/report.md", sep="", flush=True)
    return metrics


def log_metrics(logger: Logger, metrics: dict[str, Any]) -> None:
    """Top-1 and top-5 of every result as ``eval/<protocol>/top1`` (and ``top5``) scalars, then flush."""
    scalars = {f"eval/{name}/{key}": row[key] for name, row in metrics["results"].items() for key in ("top1", "top5")}
    logger.log_metrics(scalars, step=0)
    logger.save()
    logger.finalize("success")


def plots(ctx: EvalContext, logger: Optional[Logger] = None) -> list[Path]:
    """t-SNE (UMAP with umap-learn) of the validation features by class; the confusion matrix of the linear
    probe's validation predictions when the ``linear`` protocol ran."""
    val_x, val_y = ctx.features("val")
    probe = ctx.artifacts.get("linear")
    with torch.no_grad():
        predictions = probe.head(val_x).argmax(1) if probe is not None else None
    return write_eval_plots(val_x, val_y, ctx.output_dir / "plots", predictions, getattr(ctx.datamodule, "classes", None),
                            ctx.num_classes, logger=logger, seed=ctx.options.seed)


def markdown_report(metrics: dict[str, Any], results: list[Result]) -> str:
    """A title, the setting (weights, images, normalization), and one table row per result."""
    norm, images = metrics["normalization"], metrics["eval_images"]
    weights = (f"**Untrained weights** (random initialization from seed {metrics['seed']}) of the checkpoint's "
               "architecture: the baseline a trained backbone should beat." if metrics["random_init"] else
               "The checkpoint's trained weights.")
    lines = [
        f"# {metrics['method']}: {metrics['checkpoint']}" + (" (random init)" if metrics["random_init"] else ""),
        "",
        f"{metrics['datamodule']}: {metrics['num_train']} training and {metrics['num_val']} validation images, "
        f"{metrics['num_classes']} classes; {metrics['feature_dim']}-d backbone features; seed {metrics['seed']}.",
        weights,
        f"Images: {describe_eval_images(images['resize'], images['crop'])}; normalized with mean "
        f"{_numbers(norm['mean'])} (from {NORMALIZATION_SOURCES[norm['mean_from']]}) and std {_numbers(norm['std'])} "
        f"(from {NORMALIZATION_SOURCES[norm['std_from']]}).",
        "",
        "| Protocol | Top-1 (%) | Top-5 (%) | Details |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {r.name} | {r.top1:.2f} | {r.top5:.2f} | {r.note} |" for r in results]
    return "\n".join(lines) + "\n"


def describe_eval_images(resize: Optional[int], crop: Optional[int]) -> str:
    steps = ([f"shorter side resized to {resize} px"] if resize is not None else ["not resized"]) + \
            ([f"centre-cropped to {crop} px"] if crop is not None else ["not cropped"])
    return ", ".join(steps)


def _numbers(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def main(args: Optional[list[str]] = None) -> dict[str, Any]:
    """Entry point of ``ssl-lightning eval``: ``args`` are what follows ``eval`` (default ``sys.argv[1:]``)."""
    parser = build_parser()
    options = parser.parse_args(sys.argv[1:] if args is None else args)
    return evaluate(options)  # errors are raised; ``ssl_lightning.cli.main`` turns them into one line


if __name__ == "__main__":
    main()
