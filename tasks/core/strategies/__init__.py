"""The registry of aggregation strategies, by the name a federation config uses."""

from __future__ import annotations

from .fedavg import FedAvg
from .fedprox import FedProx
from .strategy import Strategy

STRATEGIES: dict[str, type[Strategy]] = {FedAvg.name: FedAvg, FedProx.name: FedProx}


def build_strategy(name: str) -> Strategy:
    """A fresh strategy instance; the config model has already checked the name."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
