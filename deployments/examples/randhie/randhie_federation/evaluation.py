"""Evaluation: ``evaluate(model, data, context) -> metrics``, at the coordinator (its
held-out file) and at every site (its test file). Only these numbers leave a site.

``auc`` (any visit vs none), ``accuracy`` (at probability 0.5), ``f1`` (of the "any visit"
class), ``loss`` (log loss) and ``brier`` (mean squared error of the probability; lower is
better: the federation config declares its direction, fedround knows the others).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fedround.api import RoundContext, SiteDataset

BATCH = 1024


def evaluate(model: nn.Module, data: SiteDataset, context: RoundContext) -> dict[str, float]:
    if data.num_classes != 2:
        raise ValueError(f"expected a binary label (any_visit), got {data.num_classes} classes")
    if len(data) == 0:
        return {}
    with torch.no_grad():
        logits = torch.cat(
            [model(data.features[s : s + BATCH]) for s in range(0, len(data), BATCH)]
        )
    labels = data.labels.numpy()
    probability = torch.softmax(logits, dim=1)[:, 1].numpy().astype(np.float64)
    predicted = probability >= 0.5
    positive = labels == 1
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    metrics = {
        "accuracy": float((predicted == positive).mean()),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "loss": float(F.cross_entropy(logits, data.labels)),
        "brier": float(((probability - positive) ** 2).mean()),
    }
    if 0 < positive.sum() < len(labels):
        metrics["auc"] = auc(probability, positive)
    return metrics


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the Mann–Whitney U statistic (average ranks for ties)."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
