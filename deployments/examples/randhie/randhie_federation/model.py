"""The model factory: ``factory(**kwargs) -> torch.nn.Module``.

fedround calls ``build`` with the keys of the config's ``model`` section, plus
``in_features`` and ``out_features`` once the federated preprocessing has fixed them.
"""

from __future__ import annotations

import torch
from torch import nn


class VisitModel(nn.Module):
    """Wide & deep: a linear part for the covariates' direct effects (the plan's price
    effect, health status) plus a small ReLU network for their interactions; the two sets of
    logits are summed."""

    def __init__(
        self, in_features: int, out_features: int, hidden: int, depth: int, dropout: float
    ) -> None:
        super().__init__()
        self.wide = nn.Linear(in_features, out_features)
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.deep = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.wide(features) + self.deep(features)  # type: ignore[no-any-return]


def build(
    in_features: int, out_features: int, hidden: int = 32, depth: int = 2, dropout: float = 0.0
) -> nn.Module:
    """The network for ``in_features`` standardized inputs and ``out_features`` logits."""
    if in_features < 1 or out_features < 1:
        raise ValueError(f"need at least one input and output, got {in_features}, {out_features}")
    return VisitModel(in_features, out_features, hidden, depth, dropout)
