"""Evaluation of frozen features: caching, linear probe, label fractions, fine-tuning, pseudo-labels (feature
extraction and kNN scoring live one floor lower, in ``ssl_lightning.scoring``, and are re-exported here)."""

from ssl_lightning.eval.cache import FeatureCache, feature_cache_key, file_sha256
from ssl_lightning.eval.finetune import FineTuneClassifier, FineTuneConfig, FineTuneResult, finetune
from ssl_lightning.eval.label_fractions import label_fraction_indices
from ssl_lightning.eval.linear_probe import LinearProbeResult, linear_probe, train_linear, train_linear_grid
from ssl_lightning.eval.pseudo_label import PseudoLabelResult, pseudo_label_refinement, select_confident
from ssl_lightning.scoring import extract_features, knn_accuracy, knn_predict, topk_accuracy

# ``checkpoint`` and ``command`` import the methods: import them as ``ssl_lightning.eval.checkpoint`` /
# ``ssl_lightning.eval.command``.
__all__ = [
    "FeatureCache",
    "feature_cache_key",
    "file_sha256",
    "extract_features",
    "FineTuneClassifier",
    "FineTuneConfig",
    "FineTuneResult",
    "finetune",
    "knn_accuracy",
    "knn_predict",
    "label_fraction_indices",
    "LinearProbeResult",
    "linear_probe",
    "train_linear",
    "train_linear_grid",
    "topk_accuracy",
    "PseudoLabelResult",
    "pseudo_label_refinement",
    "select_confident",
]
