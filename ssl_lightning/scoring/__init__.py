"""Pure scoring of frozen features, shared by the training callbacks (kNN monitor) and ``eval``: feature
extraction, weighted kNN, top-k accuracy. Depends on torch alone, so both floors above can use it."""

from ssl_lightning.scoring.features import extract_features
from ssl_lightning.scoring.knn import knn_accuracy, knn_predict
from ssl_lightning.scoring.metrics import topk_accuracy

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "topk_accuracy"]
