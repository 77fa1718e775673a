"""Evaluation of frozen features: extraction and weighted kNN."""

from ssl_lightning.eval.features import extract_features
from ssl_lightning.eval.knn import knn_predict, knn_top1

__all__ = ["extract_features", "knn_predict", "knn_top1"]
