"""Pictures of frozen features: a 2-D t-SNE (van der Maaten & Hinton 2008) or UMAP (McInnes et al. 2018)
map coloured by class, and the confusion matrix of a classifier, as PNG files sent to the run's loggers.

Figures are ``matplotlib.figure.Figure`` objects saved with the Agg canvas: no pyplot figure, no display needed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

MAX_POINTS = 2000  # t-SNE costs O(n log n) per iteration; 2000 points take seconds and read well
LEGEND_MAX_CLASSES = 20


def _numpy(values: Union[torch.Tensor, np.ndarray, Sequence[Any]]) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _check_points(features: np.ndarray, labels: np.ndarray) -> None:
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"expected features (N, D) and labels (N,), got {features.shape} and {labels.shape}")
    if features.shape[0] < 3:
        raise ValueError(f"a 2-D map needs at least 3 points, got {features.shape[0]}")


def subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(n, max_points)`` points drawn without replacement by a generator seeded with ``seed``."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _save(figure: Figure, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def scatter_plot(points: np.ndarray, labels: np.ndarray, path: Union[str, Path], title: str,
                 class_names: Optional[Sequence[str]] = None) -> Path:
    """A 2-D scatter of ``points`` (N, 2) coloured by integer class; a legend up to 20 classes."""
    figure = Figure(figsize=(7, 6))
    ax = figure.add_subplot()
    classes = np.unique(labels)
    cmap = "tab10" if classes.max(initial=0) < 10 else "tab20" if classes.max(initial=0) < 20 else "viridis"
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap=cmap, s=6, alpha=0.8,
                         vmin=0, vmax=10 if cmap == "tab10" else 20 if cmap == "tab20" else classes.max())
    if len(classes) <= LEGEND_MAX_CLASSES:
        handles = [Line2D([], [], marker="o", linestyle="", color=scatter.cmap(scatter.norm(c))) for c in classes]
        names = [class_names[c] if class_names is not None and c < len(class_names) else str(c) for c in classes]
        ax.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    else:
        figure.colorbar(scatter, ax=ax, label="class")
    ax.set(title=title, xticks=[], yticks=[])
    return _save(figure, path)


def tsne_plot(features: Union[torch.Tensor, np.ndarray], labels: Union[torch.Tensor, np.ndarray],
              path: Union[str, Path], class_names: Optional[Sequence[str]] = None,
              max_points: int = MAX_POINTS, seed: int = 0) -> Path:
    """t-SNE of ``features`` (N, D) to 2-D, coloured by ``labels`` (N,), written as a PNG at ``path``.

    At most ``max_points`` points (a seeded random subset); PCA initialization and a fixed seed make the
    picture the same on every run. Perplexity is ``min(30, (n - 1) / 3)`` so that small sets work.
    """
    from sklearn.manifold import TSNE

    features, labels = _numpy(features).astype(np.float32), _numpy(labels).astype(np.int64)
    _check_points(features, labels)
    keep = subsample(len(labels), max_points, seed)
    perplexity = min(30.0, (len(keep) - 1) / 3)
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features[keep])
    return scatter_plot(points, labels[keep], path, f"t-SNE of {features.shape[1]}-d features ({len(keep)} points)", class_names)


def umap_available() -> bool:
    """Whether ``umap-learn`` is installed (it is optional: ``pip install umap-learn``)."""
    return importlib.util.find_spec("umap") is not None


def umap_plot(features: Union[torch.Tensor, np.ndarray], labels: Union[torch.Tensor, np.ndarray],
              path: Union[str, Path], class_names: Optional[Sequence[str]] = None,
              max_points: int = MAX_POINTS, seed: int = 0) -> Optional[Path]:
    """UMAP of ``features`` to 2-D like :func:`tsne_plot`; returns None (writes nothing) without ``umap-learn``."""
    if not umap_available():
        return None
    import umap

    features, labels = _numpy(features).astype(np.float32), _numpy(labels).astype(np.int64)
    _check_points(features, labels)
    keep = subsample(len(labels), max_points, seed)
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(keep) - 1), random_state=seed)
    points = reducer.fit_transform(features[keep])
    return scatter_plot(points, labels[keep], path, f"UMAP of {features.shape[1]}-d features ({len(keep)} points)", class_names)


def confusion_matrix_plot(predictions: Union[torch.Tensor, np.ndarray], labels: Union[torch.Tensor, np.ndarray],
                          path: Union[str, Path], class_names: Optional[Sequence[str]] = None,
                          num_classes: Optional[int] = None) -> Path:
    """Row-normalized confusion matrix (rows: true class, columns: predicted) as a PNG at ``path``.

    Classes are ``range(num_classes)`` (default: ``len(class_names)``, else the largest index + 1), so a
    class never predicted still has its column. Cell values are printed up to 20 classes.
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    predictions, labels = _numpy(predictions).astype(np.int64), _numpy(labels).astype(np.int64)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(f"expected predictions (N,) and labels (N,), got {predictions.shape} and {labels.shape}")
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else int(max(predictions.max(), labels.max())) + 1
    if predictions.size and (min(predictions.min(), labels.min()) < 0 or max(predictions.max(), labels.max()) >= num_classes):
        raise ValueError(f"predictions and labels must lie in [0, {num_classes})")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
    side = min(4 + 0.35 * num_classes, 20)
    figure = Figure(figsize=(side, side))
    ax = figure.add_subplot()
    display = ConfusionMatrixDisplay.from_predictions(
        labels, predictions, labels=list(range(num_classes)), normalize="true", ax=ax, colorbar=False,
        display_labels=list(class_names) if class_names is not None else None, cmap="Blues",
        include_values=num_classes <= LEGEND_MAX_CLASSES, values_format=".2f",
        xticks_rotation="vertical",
    )
    figure.colorbar(display.im_, ax=ax, fraction=0.046, pad=0.04)
    accuracy = float((predictions == labels).mean()) * 100 if labels.size else float("nan")
    ax.set_title(f"confusion matrix (row-normalized), top-1 {accuracy:.1f}%")
    return _save(figure, path)


def log_images(logger: Union[Logger, Iterable[Logger], None], paths: Iterable[Union[str, Path]], step: int = 0,
               prefix: str = "eval/") -> None:
    """Send each PNG to W&B (``log_image``) and TensorBoard (``add_image``) under ``prefix + file stem``.

    ``logger`` is a Lightning logger, several (``trainer.loggers``) or None (nothing is sent).
    """
    from torchvision.io import ImageReadMode, decode_png, read_file

    loggers = [] if logger is None else [logger] if isinstance(logger, Logger) else list(logger)
    for path in map(Path, paths):
        key = prefix + path.stem
        for each in loggers:
            if isinstance(each, WandbLogger):
                each.log_image(key=key, images=[str(path)], step=step)
            elif isinstance(each, TensorBoardLogger):
                each.experiment.add_image(key, decode_png(read_file(str(path)), ImageReadMode.RGB), step)


def write_eval_plots(features: Union[torch.Tensor, np.ndarray], labels: Union[torch.Tensor, np.ndarray],
                     out_dir: Union[str, Path], predictions: Union[torch.Tensor, np.ndarray, None] = None,
                     class_names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                     logger: Union[Logger, Iterable[Logger], None] = None, seed: int = 0) -> list[Path]:
    """``tsne.png`` (and ``umap.png`` with umap-learn) of ``features`` by ``labels``, and ``confusion.png`` of
    ``predictions`` when given, in ``out_dir``; sent to ``logger`` when one is given. Returns the files."""
    paths = [tsne_plot(features, labels, Path(out_dir) / "tsne.png", class_names, seed=seed)]
    umap_path = umap_plot(features, labels, Path(out_dir) / "umap.png", class_names, seed=seed)
    paths += [umap_path] if umap_path is not None else []
    if predictions is not None:
        paths.append(confusion_matrix_plot(predictions, labels, Path(out_dir) / "confusion.png", class_names, num_classes))
    log_images(logger, paths)
    return paths
