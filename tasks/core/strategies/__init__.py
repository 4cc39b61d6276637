"""Aggregation strategies, one algorithm per module, and the registry a config names.

``strategy.name`` picks the server optimizer (and, for FedProx, the sites' proximal
term); ``strategy.aggregator`` how a round's updates are combined; ``clip`` and
``weighting`` / ``max_site_share`` what each update may weigh. :func:`build_strategy`
assembles them into a :class:`~.server.ServerStrategy`.

============  ====================================================  ===========================
module        algorithm                                             paper
============  ====================================================  ===========================
fedavg        xₜ₊₁ = xₜ + η·Δₜ                                     McMahan et al. 2017
fedprox       FedAvg at the server (proximal term at the sites)     Li et al. 2020
fedavgm       server momentum                                       Hsu et al. 2019
adaptive      FedAdagrad, FedYogi, FedAdam                          Reddi et al. 2021
scaffold      server and site control variates (client drift)       Karimireddy et al. 2020
fedbuff       asynchronous rounds: K staleness-weighted updates     Nguyen et al. 2022
mean          streamed weighted mean (O(model))                     McMahan et al. 2017
median        coordinate-wise median (O(n × model))                 Yin et al. 2018
trimmed_mean  coordinate-wise β-trimmed mean (O(n × model))         Yin et al. 2018
krum          Krum, Multi-Krum (O(n × model))                       Blanchard et al. 2017
clipping      update-norm clipping, fixed or × round median         Sun et al. 2019
weighting     example / uniform weights, per-site share cap         McMahan et al. 2018
============  ====================================================  ===========================
"""

from __future__ import annotations

from typing import Any, cast

from ..config import StrategyConfig
from .adaptive import FedAdagrad, FedAdam, FedYogi
from .base import (
    AggregationError,
    Aggregator,
    RoundReport,
    ServerOptimizer,
    Strategy,
    StreamingAggregator,
)
from .clipping import NormClipping, update_norm
from .fedavg import FedAvg, fedavg
from .fedavgm import FedAvgM
from .fedbuff import BufferedAsync, Submission, staleness_weight
from .fedprox import FedProx
from .krum import Krum, MultiKrum
from .mean import WeightedMean
from .median import CoordinateMedian
from .scaffold import Scaffold, ScaffoldStep
from .server import ServerStrategy
from .trimmed_mean import TrimmedMean
from .weighting import Weighting, capped_weights

__all__ = [
    "AGGREGATORS",
    "STRATEGIES",
    "AggregationError",
    "Aggregator",
    "BufferedAsync",
    "CoordinateMedian",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Krum",
    "MultiKrum",
    "NormClipping",
    "RoundReport",
    "Scaffold",
    "ScaffoldStep",
    "ServerOptimizer",
    "ServerStrategy",
    "Strategy",
    "StreamingAggregator",
    "Submission",
    "TrimmedMean",
    "WeightedMean",
    "Weighting",
    "build_aggregator",
    "build_optimizer",
    "build_strategy",
    "capped_weights",
    "fedavg",
    "staleness_weight",
    "update_norm",
]

# Server optimizers by ``strategy.name``.
STRATEGIES: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, ScaffoldStep)
}
# Aggregators by ``strategy.aggregator``.
AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (WeightedMean, CoordinateMedian, TrimmedMean, Krum, MultiKrum)
}


def build_optimizer(config: StrategyConfig) -> ServerOptimizer:
    """The server optimizer ``config.name`` names, with its hyperparameters."""
    lr = config.effective_server_lr
    if config.name == "fedavg":
        return FedAvg(lr)
    if config.name == "fedprox":
        return FedProx(lr)
    if config.name == "fedavgm":
        return FedAvgM(lr, config.effective_momentum)
    if config.name == "scaffold":
        return ScaffoldStep(lr)
    adaptive: dict[str, type[FedAdam | FedYogi | FedAdagrad]] = {
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
        "fedadagrad": FedAdagrad,
    }
    if config.name in adaptive:
        return adaptive[config.name](
            lr, config.effective_beta1, config.effective_beta2, config.effective_tau
        )
    raise ValueError(f"unknown strategy {config.name!r}; choose one of {sorted(STRATEGIES)}")


def build_aggregator(config: StrategyConfig) -> Aggregator:
    """The aggregator ``config.aggregator`` names, with its parameters."""
    if config.aggregator == "mean":
        return WeightedMean()
    if config.aggregator == "median":
        return CoordinateMedian()
    if config.aggregator == "trimmed_mean":
        return TrimmedMean(config.effective_trim_beta)
    if config.aggregator == "krum":
        return Krum(config.effective_krum_f)
    if config.aggregator == "multi_krum":
        return MultiKrum(config.effective_krum_f, config.multi_krum_m)
    raise ValueError(
        f"unknown aggregator {config.aggregator!r}; choose one of {sorted(AGGREGATORS)}"
    )


def build_strategy(
    config: StrategyConfig | str = "fedavg", population: int | None = None
) -> ServerStrategy:
    """A fresh strategy for a validated ``strategy:`` config section (or a bare name,
    which takes every default). ``population``: the number of sites in the federation,
    N in SCAFFOLD's c ← c + (|S|/N)·mean(Δcᵢ) (without it, N = |S|)."""
    if isinstance(config, str):
        if config not in STRATEGIES:
            raise ValueError(f"unknown strategy {config!r}; choose one of {sorted(STRATEGIES)}")
        # Every default; FedProx's μ acts at the sites only, so the server needs none.
        config = StrategyConfig.model_construct(name=cast(Any, config))
    clip = config.clip
    if config.name == "scaffold":
        return Scaffold(
            config.effective_server_lr,
            aggregator=build_aggregator(config),
            clipping=NormClipping(clip.mode, clip.effective_multiplier, clip.bound),
            weighting=Weighting(config.weighting, config.max_site_share),
            max_buffered_updates=config.max_buffered_updates,
            population=population,
        )
    return ServerStrategy(
        optimizer=build_optimizer(config),
        aggregator=build_aggregator(config),
        clipping=NormClipping(clip.mode, clip.effective_multiplier, clip.bound),
        weighting=Weighting(config.weighting, config.max_site_share),
        max_buffered_updates=config.max_buffered_updates,
    )
