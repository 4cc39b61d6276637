"""Built-in evaluation (used centrally and at sites): named metrics with known directions.

Classification: ``loss`` (cross-entropy), ``accuracy``, ``f1`` (macro) and, for two
classes, ``auc``. Regression: ``loss`` (the training loss, MSE by default), ``mse``,
``mae``, ``rmse``, ``r2``. A federation's own ``evaluate`` function replaces these.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .usercode import SiteDataset


@torch.no_grad()
def predict(model: nn.Module, features: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The model's outputs over the whole set (batches of 256 fit in CPU caches: about twice
    as fast here as one batch of 1,000)."""
    model.eval()
    outputs = [model(features[s : s + batch_size]) for s in range(0, len(features), batch_size)]
    return torch.cat(outputs) if outputs else torch.zeros(0)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    n = len(labels)
    if n == 0:
        return {}
    loss = float(F.cross_entropy(logits, labels, reduction="sum")) / n
    predicted = logits.argmax(dim=1)
    metrics = {"loss": loss, "accuracy": float((predicted == labels).sum()) / n}
    classes = logits.shape[1]
    f1s = []
    for c in range(classes):
        tp = int(((predicted == c) & (labels == c)).sum())
        fp = int(((predicted == c) & (labels != c)).sum())
        fn = int(((predicted != c) & (labels == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    metrics["f1"] = float(np.mean(f1s)) if f1s else 0.0
    if classes == 2 and 0 < int(labels.sum()) < n:
        metrics["auc"] = _binary_auc((logits[:, 1] - logits[:, 0]).numpy(), labels.numpy())
    return metrics


def _binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def regression_metrics(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    n = len(targets)
    if n == 0:
        return {}
    error = predictions.reshape(-1).double() - targets.reshape(-1).double()
    mse = float((error**2).mean())
    variance = float(((targets.double() - targets.double().mean()) ** 2).mean())
    return {
        "loss": mse,
        "mse": mse,
        "mae": float(error.abs().mean()),
        "rmse": mse**0.5,
        "r2": 1.0 - mse / variance if variance > 0 else 0.0,
    }


def builtin_metrics(model: nn.Module, data: SiteDataset) -> dict[str, float]:
    """fedround's metrics for the dataset's task."""
    outputs = predict(model, data.features)
    if data.task == "classification":
        return classification_metrics(outputs, data.labels)
    return regression_metrics(outputs, data.labels)
