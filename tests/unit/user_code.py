"""A user's package, as the unit tests' federations name it (``<this module>:function``):
model factories, train and evaluate functions, good and bad."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import nn

from fedround.api import RoundContext, SiteDataset, TrainingConfig

NOT_CALLABLE = 42


def tabular(in_features: int, out_features: int, width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, out_features))


def fixed_size(width: int = 3) -> nn.Module:
    return nn.Linear(width, 2)


def any_kwargs(**kwargs: int) -> nn.Module:
    return nn.Linear(kwargs.get("in_features", 1), kwargs.get("out_features", 1))


def raises(width: int = 3) -> nn.Module:
    raise ValueError(f"width {width} is not supported")


def not_a_module() -> object:
    return {"weight": torch.zeros(1)}


def no_parameters() -> nn.Module:
    return nn.ReLU()


def train_sgd(
    model: nn.Module, data: SiteDataset, settings: TrainingConfig, context: RoundContext
) -> Mapping[str, float]:
    """A plain loop of the user's own: full-batch SGD on cross-entropy, no FedProx in it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
    loss = torch.tensor(0.0)
    for _ in range(settings.local_epochs):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(data.features), data.labels)
        loss.backward()
        optimizer.step()
    return {"loss": loss.item(), "site_steps": float(settings.local_epochs)}


def train_raises(
    model: nn.Module, data: SiteDataset, settings: TrainingConfig, context: RoundContext
) -> Mapping[str, float]:
    raise RuntimeError(f"disk full at {context.site}")


def train_nan_metrics(
    model: nn.Module, data: SiteDataset, settings: TrainingConfig, context: RoundContext
) -> Mapping[str, float]:
    return {"loss": float("nan")}


def train_nan_weights(
    model: nn.Module, data: SiteDataset, settings: TrainingConfig, context: RoundContext
) -> Mapping[str, float]:
    with torch.no_grad():
        next(iter(model.parameters())).fill_(float("nan"))
    return {"loss": 0.1}


def train_hangs(
    model: nn.Module, data: SiteDataset, settings: TrainingConfig, context: RoundContext
) -> Mapping[str, float]:
    while True:
        time.sleep(0.05)


def train_returns_list(
    model: nn.Module, data: SiteDataset, settings: TrainingConfig, context: RoundContext
) -> object:
    return [0.5]


def exits(width: int = 3) -> nn.Module:
    raise SystemExit("usage: build --width N")
