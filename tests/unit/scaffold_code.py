"""A user's package for the SCAFFOLD tests: a one-weight model and a train function of the
user's own whose gradient is a constant the site's data sets (so every step is exact)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedround.api import RoundContext, SiteDataset, TrainingConfig


class OneWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def one_weight() -> nn.Module:
    return OneWeight()


def constant_gradient(
    model: nn.Module, data: SiteDataset, settings: TrainingConfig, context: RoundContext
) -> Mapping[str, float]:
    """``local_epochs`` plain SGD steps on loss = g·w, g = the mean of the site's features:
    the gradient is g at every step, whatever w is."""
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
    g = data.features.mean()
    for _ in range(settings.local_epochs):
        optimizer.zero_grad()
        (g * model.w).sum().backward()
        optimizer.step()
    return {"steps": float(settings.local_epochs)}
