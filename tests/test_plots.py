"""The plots are valid PNG files of the expected content, deterministic, and reach the loggers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from ssl_lightning.eval import plots
from ssl_lightning.eval.plots import (
    confusion_matrix_plot,
    log_images,
    subsample,
    tsne_plot,
    umap_available,
    umap_plot,
    write_eval_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
        assert len(np.unique(np.asarray(image.convert("L")))) > 2  # something was drawn


def clusters(n: int = 100, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % classes
    features = torch.randn(n, 16, generator=torch.Generator().manual_seed(0)) + 4 * torch.eye(16)[labels]
    return features, labels


def test_tsne_and_confusion_matrix_of_an_evaluation(tmp_path: Path) -> None:
    features, labels = clusters()
    paths = write_eval_plots(features, labels, tmp_path / "plots", predictions=labels, class_names=list("abcde"))
    expected = ["tsne", "umap", "confusion"]
    assert paths == [tmp_path / "plots" / f"{name}.png" for name in expected]
    for path in paths:
        assert_png(path)
    with pytest.raises(ValueError, match=r"features \(N, D\) and labels \(N,\)"):
        tsne_plot(features, labels[:-1], tmp_path / "bad.png")


def test_subsample_is_seeded_sorted_and_bounded() -> None:
    a, b = subsample(5000, 2000, seed=0), subsample(5000, 2000, seed=0)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 2000 and np.all(np.diff(a) > 0) and a.max() < 5000
    assert not np.array_equal(a, subsample(5000, 2000, seed=1))
    np.testing.assert_array_equal(subsample(50, 2000, seed=0), np.arange(50))


def test_umap_plot_separates_clusters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """umap-learn is a test dependency (the ``dev`` extra): the plot is drawn, and the 2-D points it draws keep
    5 well-separated clusters apart (leave-one-out nearest neighbour in the plane finds the class)."""
    assert umap_available(), "umap-learn is missing: pip install -e '.[dev]'"
    drawn: list[np.ndarray] = []
    scatter = plots.scatter_plot

    def keep_points(points: np.ndarray, *args, **kwargs) -> Path:  # type: ignore[no-untyped-def]
        drawn.append(points)
        return scatter(points, *args, **kwargs)

    monkeypatch.setattr(plots, "scatter_plot", keep_points)
    features, labels = clusters()
    assert_png(umap_plot(features, labels, tmp_path / "umap.png"))
    points = torch.as_tensor(drawn[0], dtype=torch.float64)
    assert points.shape == (100, 2)
    distances = torch.cdist(points, points).fill_diagonal_(float("inf"))
    assert (labels[distances.argmin(dim=1)] == labels).double().mean() > 0.9


def test_umap_is_skipped_without_umap_learn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "umap_available", lambda: False)
    features, labels = clusters()
    assert umap_plot(features, labels, tmp_path / "umap.png") is None and not (tmp_path / "umap.png").exists()


def test_confusion_matrix_png_and_errors(tmp_path: Path) -> None:
    labels = torch.arange(40) % 4
    predictions = labels.clone()
    predictions[::5] = 0
    path = confusion_matrix_plot(predictions, labels, tmp_path / "confusion.png", class_names=["w", "x", "y", "z"])
    assert_png(path)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        confusion_matrix_plot(predictions, labels, tmp_path / "bad.png", num_classes=3)
    with pytest.raises(ValueError, match="class_names has 2 names for 4 classes"):
        confusion_matrix_plot(predictions, labels, tmp_path / "bad.png", class_names=["a", "b"], num_classes=4)


def test_log_images_to_tensorboard_and_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    labels = torch.arange(12) % 3
    path = confusion_matrix_plot(labels, labels, tmp_path / "confusion.png")
    logger = TensorBoardLogger(tmp_path / "tb")
    try:
        log_images([logger, WandbLogger(save_dir=tmp_path, project="test")], [path], step=7)
    finally:
        wandb.finish()
    log_images(None, [path])  # no logger: nothing to do
    assert list(tmp_path.glob("wandb/*run-*/files/media/images/eval/confusion_*.png"))
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    [image] = events.Images("eval/confusion")
    with Image.open(path) as png:
        assert image.step == 7 and (image.width, image.height) == png.size
