"""Every config as written: the CIFAR-10 and ImageNet recipes are built by ``ssl-lightning fit``'s own parser with
their own datamodule class, backbone and heads (ResNet-50, 8192-d projectors, 65536 DINO outputs: construction
only, no data read, nothing downloaded), and every file under ``configs/`` parses through its command's parser.

Only the file system is stubbed: an ImageNet config's ``root`` points at a temporary folder of empty ``.jpg``
files (``ImageFolder`` lists its files when built; nothing is decoded before ``setup``). The expected shapes
come from the YAML text and from torchvision/timm's own models, never from the code under test.
"""

from __future__ import annotations

import gc
import inspect
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from lightning.pytorch.plugins import TorchSyncBatchNorm
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

from ssl_lightning.cli.errors import ConfigError
from ssl_lightning.cli.lightning_cli import SSLLightningCLI, run_cli
from ssl_lightning.eval.command import build_parser as eval_parser
from ssl_lightning.eval.export import build_target, export_target, exported_name
from ssl_lightning.optim import LARS, build_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted([*CONFIGS.glob("*_cifar10.yaml"), *CONFIGS.glob("*_imagenet.yaml")])
OTHER_FIT_CONFIGS = sorted(set(CONFIGS.glob("*.yaml")) - set(RECIPES) - {CONFIGS / "base.yaml"})
OVERLAYS = {"logging/wandb.yaml": "simclr_bundled.yaml", "eval/finetune.yaml": "eval/bundled.yaml"}
OPTIMIZERS = {"lars": LARS, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def read(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def image_root(tmp_path: Path) -> Path:
    """An ImageNet-style folder of empty ``.jpg`` files: enough to build ``ImageFolder``, nothing to decode."""
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for name in ("n01440764", "n01443537"):
            (root / split / name).mkdir(parents=True)
            (root / split / name / "0.jpg").touch()
    return root


def build(config: Path, tmp_path: Path, *extra: str) -> SSLLightningCLI:
    """``ssl-lightning fit --config CONFIG`` up to the point where training would start (``run=False``)."""
    args = ["fit", f"--config={config}", f"--runs_root={tmp_path / 'runs'}", *extra]
    if read(config)["data"]["class_path"] == "ImageFolder":
        args.append(f"--data.init_args.root={image_root(tmp_path)}")
    return run_cli(args, run=False)


def linear_shapes(module: nn.Module) -> list[tuple[int, ...]]:
    """The weight shapes (out, in) of every ``nn.Linear`` in ``module``, in order."""
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, nn.Linear)]


def chain(*dims: int) -> list[tuple[int, int]]:
    """The weight shapes of linear layers mapping ``dims[0] -> dims[1] -> ...``."""
    return [(dims[i + 1], dims[i]) for i in range(len(dims) - 1)]


def mlp(in_dim: int, hidden: int, out: int, layers: int) -> list[tuple[int, int]]:
    return chain(in_dim, *[hidden] * (layers - 1), out)


#: method -> (resolved arguments, backbone feature dim) -> {submodule or buffer: expected shapes}. Written from
#: the papers' heads: a list is the Linear layers' weight shapes, a tuple one buffer's shape.
HEADS: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {
    "SimCLR": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 2)},
    "MoCoV2": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 2),
                            "key_projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 2),
                            "queue": (a["queue_size"], a["projection_dim"])},
    "BYOL": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 2),
                          "target_projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 2),
                          "predictor": mlp(a["projection_dim"], a["prediction_hidden_dim"], a["projection_dim"], 2)},
    "MoCoV3": lambda a, f: {
        "projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], a["projection_layers"]),
        "momentum_projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], a["projection_layers"]),
        "predictor": mlp(a["projection_dim"], a["prediction_hidden_dim"], a["projection_dim"], 2)},
    "SimSiam": lambda a, f: {
        "projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], a["projection_layers"]),
        "predictor": mlp(a["projection_dim"], a["prediction_hidden_dim"], a["projection_dim"], 2)},
    "SupCon": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 2)},
    "DenseCL": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 2),
                             "queue": (a["queue_size"], a["projection_dim"]),
                             "dense_projector.0.weight": (a["dense_hidden_dim"], f, 1, 1),
                             "dense_projector.2.weight": (a["projection_dim"], a["dense_hidden_dim"], 1, 1),
                             "dense_queue": (a["queue_size"], a["projection_dim"])},
    "WMSE": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 2)},
    "TiCo": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], a["projection_layers"]),
                          "covariance": (a["projection_dim"], a["projection_dim"])},
    "NNCLR": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], a["projection_layers"]),
                           "predictor": mlp(a["projection_dim"], a["prediction_hidden_dim"], a["projection_dim"], 2),
                           "queue": (a["queue_size"], a["projection_dim"])},
    "DeepClusterV2": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 2),
                                   "prototypes": [(k, a["projection_dim"]) for k in a["num_prototypes"]],
                                   "memory_bank": (len(a["crops_for_assign"]), None, a["projection_dim"]),
                                   "assignments": (len(a["num_prototypes"]), None)},
    "BarlowTwins": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], a["projection_layers"])},
    "VICReg": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], a["projection_layers"])},
    "VICRegL": lambda a, f: {
        "projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], a["projection_layers"]),
        "local_projector": mlp(f, a["local_projection_hidden_dim"], a["local_projection_dim"], a["local_projection_layers"])},
    "SwAV": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 2),
                          "prototypes": chain(a["projection_dim"], a["num_prototypes"]),
                          "queue": (a["queue_length"], len(a["crops_for_assign"]), a["projection_dim"])},
    "DINO": lambda a, f: {
        "head": mlp(f, a["hidden_dim"], a["bottleneck_dim"], a["head_layers"]) + chain(a["bottleneck_dim"], a["out_dim"]),
        "teacher_head": mlp(f, a["hidden_dim"], a["bottleneck_dim"], a["head_layers"]) + chain(a["bottleneck_dim"], a["out_dim"]),
        "center": (1, a["out_dim"])},
    "MAE": lambda a, f: {"decoder.embed": chain(f, a["decoder_dim"]), "decoder.mask_token": (1, 1, a["decoder_dim"])},
    "Rotation": lambda a, f: {"head": mlp(f, a["head_hidden_dim"], 4, a["head_layers"])},
    "Jigsaw": lambda a, f: {"head": mlp(a["grid_size"] ** 2 * f, a["head_hidden_dim"], a["num_permutations"], 2),
                            "permutations": (a["num_permutations"], a["grid_size"] ** 2)},
    # a convolution to 2 (ab) channels, or one per ab bin (written here as "any")
    "Colorization": lambda a, f: {"decoder.out.weight": (2 if a["mode"] == "regression" else None, None, 3, 3)},
    "Inpainting": lambda a, f: {"decoder.out.weight": (3, None, 3, 3)},
    "IBOT": lambda a, f: {
        "head": mlp(f, a["hidden_dim"], a["bottleneck_dim"], a["head_layers"]) + chain(a["bottleneck_dim"], a["out_dim"]),
        "teacher_head": mlp(f, a["hidden_dim"], a["bottleneck_dim"], a["head_layers"]) + chain(a["bottleneck_dim"], a["out_dim"]),
        "center": (1, a["out_dim"]), "patch_center": (1, a["patch_out_dim"] or a["out_dim"]), "mask_token": (f,)},
    "DINOv2": lambda a, f: {
        name: mlp(f, a["hidden_dim"], a["bottleneck_dim"], a["head_layers"]) + chain(a["bottleneck_dim"], a[dim] or a["out_dim"])
        for name, dim in (("head", "out_dim"), ("teacher_head", "out_dim"), ("patch_head", "patch_out_dim"),
                          ("teacher_patch_head", "patch_out_dim"))},
    "IJEPA": lambda a, f: {"predictor.embed": chain(f, a["predictor_dim"]), "predictor.proj": chain(a["predictor_dim"], f),
                           "predictor.mask_token": (a["predictor_dim"],)},
    "SimMIM": lambda a, f: {"head.0.weight": (a["backbone_kwargs"]["patch_size"] ** 2 * 3, f, 1, 1), "mask_token": (f,)},
    "MSN": lambda a, f: {"head": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 3),
                         "target_head": mlp(f, a["projection_hidden_dim"], a["projection_dim"], 3),
                         "prototypes": (a["num_prototypes"], a["projection_dim"])},
    # a linear layer in, residual MLP blocks (expansion head_mlp_ratio), a linear layer to the pixels of a patch
    "AIM": lambda a, f: {"head.proj_in": chain(f, a["head_dim"]),
                         "head.proj_out": chain(a["head_dim"], a["backbone_kwargs"]["patch_size"] ** 2 * 3)},
    "LeJEPA": lambda a, f: {"projector": mlp(f, a["projection_hidden_dim"], a["projection_dim"], a["projection_layers"])},
}


HEADS["FastSiam"] = HEADS["SimSiam"]  # SimSiam's projector and predictor, K views


def submodule(model: nn.Module, name: str) -> Any:
    for part in name.split("."):
        model = getattr(model, part)
    return model


def check_heads(model: nn.Module, args: dict[str, Any]) -> None:
    expected = HEADS[type(model).__name__](args, model.backbone.feature_dim)
    for name, shapes in expected.items():
        found = submodule(model, name)
        if isinstance(shapes, list):
            assert linear_shapes(found) == shapes, f"{name}: linear layers {linear_shapes(found)}, expected {shapes}"
        else:  # a buffer or parameter; None: any size
            actual = tuple(found.shape)
            assert len(actual) == len(shapes) and all(e in (None, s) for s, e in zip(actual, shapes)), \
                f"{name}: shape {actual}, expected {shapes}"
    if type(model).__name__ == "MAE":
        blocks = model.decoder.blocks
        assert len(blocks) == args["decoder_depth"] and blocks[0].attn.num_heads == args["decoder_num_heads"]


def check_backbone(model: nn.Module, name: str, kwargs: dict[str, Any]) -> None:
    """Parameter and buffer shapes, key for key, equal those of the torchvision/timm model of that name."""
    target = export_target(name, kwargs)
    ours = {exported_name(k, target): tuple(v.shape) for k, v in model.backbone.state_dict().items()}
    with torch.device("meta"):  # shapes only: no memory, no initialization
        theirs = {k: tuple(v.shape) for k, v in build_target(target).state_dict().items()}
    assert ours == theirs, f"backbone {name}{kwargs} differs from {target.library} {target.model}"


def resolved_args(model: nn.Module) -> dict[str, Any]:
    """The method's constructor arguments: its signature's defaults (through the class hierarchy), then hparams."""
    defaults: dict[str, Any] = {}
    for cls in reversed(type(model).__mro__):
        if "__init__" in vars(cls):
            for name, p in inspect.signature(cls.__init__).parameters.items():
                if p.default is not inspect.Parameter.empty:
                    defaults[name] = p.default
    return {**defaults, **model.hparams}


def same(actual: Any, written: Any) -> bool:
    if isinstance(written, list):
        return list(actual) == written
    return actual == written


def check_trainer(cli: SSLLightningCLI, trainer_yaml: dict[str, Any], base: dict[str, Any]) -> None:
    written = {**base["trainer"], **trainer_yaml}
    trainer, config = cli.trainer, cli.config.fit.trainer
    strategy = written.get("strategy", "auto")
    assert config.strategy == strategy and config.devices == written["devices"]
    assert isinstance(trainer.strategy, DDPStrategy if strategy == "ddp" else SingleDeviceStrategy)
    layer_sync = getattr(trainer.strategy, "_layer_sync", None)
    assert isinstance(layer_sync, TorchSyncBatchNorm) == bool(written.get("sync_batchnorm", False))
    assert trainer.precision == written["precision"] and trainer.max_epochs == written["max_epochs"]
    callbacks = {type(c).__name__ for c in trainer.callbacks}
    expected = [c["class_path"].rsplit(".", 1)[-1] for c in [*written["callbacks"], *trainer_yaml.get("callbacks+", [])]]
    assert set(expected) <= callbacks, f"callbacks {sorted(callbacks)} lack some of {expected}"


def check_data(datamodule: Any, data_yaml: dict[str, Any]) -> None:
    assert type(datamodule).__name__ == data_yaml["class_path"]
    init = data_yaml["init_args"]
    assert datamodule.batch_size == init["batch_size"] and datamodule.num_workers == init["num_workers"]
    if data_yaml["class_path"] == "CIFAR10":
        assert datamodule.root == Path(init["root"])
    views = datamodule.views
    for key, value in init["views"].items():
        assert same(getattr(views, key), value), f"views.{key} = {getattr(views, key)!r}, written {value!r}"
    assert views.total_views == views.num_views + init["views"].get("num_local", 0)


def check_optimizer(model: nn.Module, optim_yaml: dict[str, Any]) -> None:
    for key, value in optim_yaml.items():
        assert same(getattr(model.optim, key), value), f"optim.{key} = {getattr(model.optim, key)!r}, written {value!r}"
    optimizer = build_optimizer(model.optim, model.optimized_modules(), 256)  # 256: every lr rule leaves it as is
    assert type(optimizer) is OPTIMIZERS[optim_yaml["name"]] and optimizer.defaults["lr"] == pytest.approx(optim_yaml["lr"])
    decays = {group["weight_decay"] for group in optimizer.param_groups}
    assert decays == {0.0, optim_yaml["weight_decay"]} or decays == {optim_yaml["weight_decay"]}


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds_as_written(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    written, base = read(config), read(CONFIGS / "base.yaml")
    with torch.device("meta"):  # shapes only: the ViT-H/L recipes and their teachers hold gigabytes of weights
        cli = build(config, tmp_path)
    try:
        model, model_yaml = cli.model, written["model"]
        assert type(model).__name__ == model_yaml["class_path"]
        args = resolved_args(model)
        for key, value in model_yaml["init_args"].items():
            if key != "optim":
                assert same(args[key], value), f"model.{key} = {args[key]!r}, written {value!r}"
        check_backbone(model, model_yaml["init_args"]["backbone"], model_yaml["init_args"].get("backbone_kwargs", {}))
        check_heads(model, args)
        check_optimizer(model, model_yaml["init_args"]["optim"])
        check_data(cli.datamodule, written["data"])
        check_trainer(cli, written.get("trainer", {}), base)
    finally:
        del cli
        gc.collect()


@pytest.mark.parametrize("config", OTHER_FIT_CONFIGS, ids=lambda p: p.stem)
def test_other_fit_configs_build(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled quick-starts and the text recipe (its corpus path stubbed) build through ``fit``'s parser."""
    monkeypatch.chdir(tmp_path)
    written = read(config)
    extra = []
    if written["data"]["class_path"] == "TextData":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("a few words of text\n")
        extra.append(f"--data.init_args.files={corpus}")
    cli = build(config, tmp_path, *extra)
    assert type(cli.model).__name__ == written["model"]["class_path"]
    assert type(cli.datamodule).__name__ == written["data"]["class_path"]
    assert cli.trainer.max_epochs == written["trainer"]["max_epochs"]
    assert cli.trainer.global_step == 0 and not list((tmp_path / "runs").rglob("*.ckpt"))  # built, never run


def test_wandb_overlay_replaces_the_loggers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build(CONFIGS / OVERLAYS["logging/wandb.yaml"], tmp_path, f"--config={CONFIGS / 'logging' / 'wandb.yaml'}")
    written = read(CONFIGS / "logging" / "wandb.yaml")["trainer"]["logger"]
    assert [type(logger).__name__ for logger in cli.trainer.loggers] == [l["class_path"].rsplit(".", 1)[-1] for l in written]


def eval_options(*configs: Path, extra: tuple[str, ...] = ()) -> Any:
    """``ssl-lightning eval --config ...`` parsed and instantiated (the datamodule is built, not set up)."""
    parser = eval_parser()
    options = parser.parse_args([*(f"--config={c}" for c in configs), "--checkpoint=unused.ckpt", *extra])
    return parser.instantiate(options)


@pytest.mark.parametrize("name", ["bundled.yaml", "cifar10.yaml", "image_folder.yaml", "finetune.yaml"])
def test_eval_configs_parse(name: str, tmp_path: Path) -> None:
    config = CONFIGS / "eval" / name
    configs = [CONFIGS / OVERLAYS[f"eval/{name}"], config] if f"eval/{name}" in OVERLAYS else [config]
    extra = (f"--data.init_args.root={image_root(tmp_path)}",) if name == "image_folder.yaml" else ()
    options = eval_options(*configs, extra=extra)
    merged: dict[str, Any] = {}
    for path in configs:
        merged.update(read(path))
    data = merged["data"]
    assert type(options.data).__name__ == data["class_path"]
    assert options.data.eval_batch_size == data["init_args"]["eval_batch_size"]
    assert options.data.views.size == data["init_args"]["views"]["size"]
    assert options.protocols == merged["protocols"]
    for section in ("knn", "linear", "finetune", "pseudo_label"):
        for key, value in merged.get(section, {}).items():
            assert same(getattr(getattr(options, section), key), value), f"{name}: {section}.{key}"


def test_a_config_that_no_longer_parses_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helpers above raise on a misspelled key (a temporary copy), so a config that breaks fails its test."""
    monkeypatch.chdir(tmp_path)
    copies = tmp_path / "configs"
    (copies / "eval").mkdir(parents=True)
    shutil.copy(CONFIGS / "base.yaml", copies / "base.yaml")
    recipe = copies / "simclr_cifar10.yaml"
    recipe.write_text((CONFIGS / "simclr_cifar10.yaml").read_text().replace("temperature:", "temperture:"))
    with pytest.raises(ConfigError, match="temperture"):
        build(recipe, tmp_path)
    (copies / "simclr_cifar10.yaml").write_text((CONFIGS / "simclr_cifar10.yaml").read_text())
    (copies / "base.yaml").write_text((CONFIGS / "base.yaml").read_text().replace("max_epochs:", "max_epoch:"))
    with pytest.raises(ConfigError, match="max_epoch"):
        build(recipe, tmp_path)  # base.yaml is read with every recipe
    evaluation = copies / "eval" / "cifar10.yaml"
    evaluation.write_text((CONFIGS / "eval" / "cifar10.yaml").read_text().replace("holdout_fraction", "holdout_fractoin"))
    with pytest.raises(Exception, match="holdout_fractoin"):
        eval_options(evaluation)
