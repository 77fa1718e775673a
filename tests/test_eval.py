"""Offline evaluation: linear probe, label fractions, feature cache, checkpoint loading, ``ssl-lightning eval``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from ssl_lightning.cli import main as cli_main
from ssl_lightning.cli import run_cli
from ssl_lightning.eval import command
from ssl_lightning.eval.cache import FeatureCache, feature_cache_key, file_sha256
from ssl_lightning.eval.label_fractions import label_fraction_indices
from ssl_lightning.eval.linear_probe import linear_probe, stratified_holdout, train_linear, train_linear_grid

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def clustered(num: int, num_classes: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Features around well separated class means: linearly separable with a wide margin."""
    means = 4 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(num) % num_classes
    return means[labels] + 0.3 * torch.randn(num, dim, generator=generator), labels


def test_linear_probe_separates_separable_features_and_sweeps_the_grid() -> None:
    g = torch.Generator().manual_seed(0)
    (train_x, train_y), (val_x, val_y) = clustered(300, 6, 16, g), clustered(120, 6, 16, g)
    shift = 50 + 10 * torch.randn(16, generator=g)  # raw features far from standardized ones
    result = linear_probe(train_x + shift, train_y, val_x + shift, val_y, num_classes=6, lrs=[0.1, 1.0],
                          weight_decays=[0.0, 1e-3], epochs=10, batch_size=64)
    assert result.top1 >= 99.0 and result.top5 == 100.0
    assert set(result.sweep) == {(0.1, 0.0), (0.1, 1e-3), (1.0, 0.0), (1.0, 1e-3)}
    assert result.sweep[(result.lr, result.weight_decay)] == max(result.sweep.values())
    # the head works on raw features: its own predictions give the reported accuracy
    assert (result.head(val_x + shift).argmax(1) == val_y).float().mean().item() * 100 == pytest.approx(result.top1)


def test_linear_probe_is_near_chance_on_random_labels() -> None:
    g = torch.Generator().manual_seed(1)
    train_x, val_x = torch.randn(400, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_y, val_y = torch.randint(0, 10, (400,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    result = linear_probe(train_x, train_y, val_x, val_y, 10, lrs=[0.1], weight_decays=[0.0], epochs=20)
    assert 3.0 < result.top1 < 17.0  # chance is 10%; the standard error on 1000 images is about 1%
    assert 40.0 < result.top5 < 60.0
    assert result.sweep == {}  # one grid point: nothing to sweep


def reference_probe(x, y, num_classes, lr, weight_decay, epochs, batch_size, seed) -> torch.nn.Module:
    """The obvious version: BatchNorm statistics, an nn.Linear, torch's SGD and cosine schedule, one head."""
    mean, std = x.mean(0), (x.var(0, unbiased=False) + 1e-5).sqrt()
    linear = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = torch.nn.functional.cross_entropy(linear((x[idx] - mean) / std), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return lambda inputs: linear((inputs - mean) / std)


def test_heads_trained_side_by_side_match_one_sgd_run_each() -> None:
    g = torch.Generator().manual_seed(5)
    x, y = 3 * torch.randn(50, 6, generator=g) + 1, torch.randint(0, 3, (50,), generator=g)
    grid = [(0.5, 0.0), (0.05, 0.01), (1.0, 0.1)]
    heads = train_linear_grid(x, y, 3, [lr for lr, _ in grid], [wd for _, wd in grid], epochs=4, batch_size=16, seed=7)
    for (lr, wd), head in zip(grid, heads):
        expected = reference_probe(x, y, 3, lr, wd, epochs=4, batch_size=16, seed=7)
        torch.testing.assert_close(head(x), expected(x), rtol=1e-4, atol=1e-4)


def test_standardization_is_folded_into_the_head() -> None:
    """Per-dimension standardization makes the probe blind to a per-dimension affine map of the features."""
    g = torch.Generator().manual_seed(2)
    x, y = clustered(64, 4, 8, g)
    scale, shift = torch.rand(8, generator=g) * 5 + 0.1, torch.randn(8, generator=g) * 20
    head = train_linear(x, y, 4, lr=0.1, epochs=3, batch_size=16)
    moved = train_linear(x * scale + shift, y, 4, lr=0.1, epochs=3, batch_size=16)
    torch.testing.assert_close(moved(x * scale + shift), head(x), rtol=1e-4, atol=1e-4)
    assert not head.weight.requires_grad


def test_holdout_is_stratified_and_seeded() -> None:
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 1)
    fit, held = stratified_holdout(labels, 0.1, seed=3)
    assert torch.equal(torch.cat([fit, held]).sort().values, torch.arange(31))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]  # a lone image stays in the fit set
    assert torch.equal(stratified_holdout(labels, 0.1, seed=3)[1], held)
    assert not torch.equal(stratified_holdout(labels, 0.1, seed=4)[1], held)


def test_label_fractions_are_balanced_seeded_and_checked() -> None:
    labels = torch.arange(1000) % 10
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    for fraction, per_class in ((0.01, 1), (0.1, 10), (0.004, 1), (0.25, 25)):
        idx = label_fraction_indices(labels, fraction, seed=0)
        assert torch.bincount(labels[idx], minlength=10).tolist() == [per_class] * 10
        assert idx.dtype == torch.long and torch.equal(idx, idx.unique())  # sorted, no repeats
    first = label_fraction_indices(labels, 0.1, seed=0)
    assert torch.equal(label_fraction_indices(labels, 0.1, seed=0), first)
    assert not torch.equal(label_fraction_indices(labels, 0.1, seed=1), first)
    rare = torch.cat([labels, torch.tensor([10, 10])])  # class 10: 2 images; 0.5 needs 46 per class
    with pytest.raises(ValueError, match="class 10: 2"):
        label_fraction_indices(rare, 0.5, seed=0)
    with pytest.raises(ValueError, match="class 11: 0"):
        label_fraction_indices(labels, 0.01, seed=0, num_classes=12)
    with pytest.raises(ValueError, match="found -1"):
        label_fraction_indices(torch.tensor([0, 1, -1]), 0.5, seed=0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        label_fraction_indices(labels, 0.0, seed=0)


def test_feature_cache_computes_once_and_keys_on_every_input(tmp_path: Path) -> None:
    calls = []

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return torch.randn(5, 3), torch.arange(5)

    cache = FeatureCache(tmp_path / "cache")
    key = feature_cache_key("abc", {"class_path": "X", "init_args": {"size": 32}}, "train")
    (x, y), hit = cache.get(key, compute)
    (x2, y2), hit2 = cache.get(key, compute)
    assert (hit, hit2, len(calls)) == (False, True, 1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    others = {feature_cache_key("abd", {"class_path": "X", "init_args": {"size": 32}}, "train"),
              feature_cache_key("abc", {"class_path": "X", "init_args": {"size": 64}}, "train"),
              feature_cache_key("abc", {"class_path": "X", "init_args": {"size": 32}}, "val")}
    assert key not in others and len(others) == 3
    cache.path(key).write_bytes(b"not a tensor file")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.get(key, compute)[1] is False
    assert len(calls) == 2 and not list((tmp_path / "cache").glob("*.tmp"))
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"x" * 3_000_001)
    assert file_sha256(blob, chunk_bytes=1 << 20) == hashlib.sha256(b"x" * 3_000_001).hexdigest()


def test_eval_command_end_to_end_reuses_cached_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A 2-step SimCLR checkpoint evaluated twice: the second run reads the cache, never calls the model,
    and gives identical numbers; an unlabeled datamodule gets a clear error."""
    monkeypatch.chdir(tmp_path)
    tiny_model = ["--model.init_args.backbone=cifar_resnet18", "--model.init_args.backbone_kwargs={base_width: 4}"]
    data = ["--data=SyntheticData", "--data.init_args.num_samples=80", "--data.init_args.num_val_samples=40",
            "--data.init_args.image_size=16", "--data.init_args.num_classes=4", "--data.init_args.batch_size=16",
            "--data.init_args.num_workers=0", "--data.init_args.views.size=16"]
    fit = run_cli(["fit", f"--config={CONFIGS / 'simclr_bundled.yaml'}", "--trainer.max_steps=2",
                   "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
                   "--trainer.logger=false",
                   "--trainer.callbacks=[{class_path: ModelCheckpoint, init_args: {save_last: true, save_top_k: 0}}]", *tiny_model, *data])
    checkpoint = fit.trainer.checkpoint_callback.last_model_path
    args = ["eval", f"--config={CONFIGS / 'eval' / 'bundled.yaml'}", f"--checkpoint={checkpoint}", *data,
            "--data.init_args.eval_batch_size=32", "--output_dir=out", "--cache_dir=cache", "--device=cpu",
            "--label_fractions=[0.1, 0.5]", "--knn.k=[5, 200]", "--linear.lrs=[0.1, 1.0]",
            "--linear.weight_decays=[0.0]", "--linear.epochs=5", "--linear.holdout_fraction=0.2"]
    cli_main(args)
    first = json.loads((tmp_path / "out" / "metrics.json").read_text())
    report = (tmp_path / "out" / "report.md").read_text()
    assert first["method"] == "SimCLR" and first["num_train"] == 80 and first["num_val"] == 40
    assert first["feature_dim"] == fit.model.backbone.feature_dim
    assert list(first["results"]) == ["knn/k=5", "knn/k=200", "linear", "10%/linear", "10%/knn/k=5",
                                      "10%/knn/k=200", "50%/linear", "50%/knn/k=5", "50%/knn/k=200"]
    assert first["results"]["knn/k=200"]["k"] == 80 and first["results"]["10%/knn/k=200"]["k"] == 8
    assert first["results"]["linear"]["lr"] in (0.1, 1.0)
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in first["results"].values())
    assert "| 10%/linear |" in report and "8 labels (2/class, seed 0)" in report
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 2
    assert "extracted into" in capsys.readouterr().out

    def no_model(*args, **kwargs):
        raise AssertionError("the second evaluation called the model")

    monkeypatch.setattr(command, "extract_features", no_model)
    cli_main(args)
    assert "read from" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == first

    cli_main([*args, "--logger=CSVLogger", "--logger.init_args.save_dir=logs", "--logger.init_args.name=eval"])
    logged = (tmp_path / "logs" / "eval" / "version_0" / "metrics.csv").read_text().splitlines()
    row = dict(zip(logged[0].split(","), logged[1].split(",")))
    assert float(row["eval/linear/top1"]) == pytest.approx(first["results"]["linear"]["top1"])
    assert float(row["eval/10%/knn/k=200/top5"]) == pytest.approx(first["results"]["10%/knn/k=200"]["top5"])

    capsys.readouterr()
    for bad, message in (("--data.init_args.labeled=false", "SyntheticData has no labels"),
                         ("--protocols=[knn, svm]", "unknown protocol")):
        with pytest.raises(SystemExit) as stopped:
            cli_main([*args, bad])
        assert stopped.value.code == 1 and message in capsys.readouterr().err
