"""Federated evaluation: the global model scored at the sites, on each site's own test file.

Sites report their figures with their round's update, one round behind: a site selected
for round r first evaluates the model it received (round r − 1's result) and reports
``eval_<metric>`` and ``eval_examples`` beside its training metrics. The coordinator
turns those into round r − 1's ``federated_<metric>``: the example-weighted mean over the
sites that reported it. For loss and accuracy that is exactly the figure over the union of
the sites' test sets; for f1 and auc it is the mean of per-site figures, weighted.

A site's weight is the examples it says it evaluated, capped (by default at the rows its
data contract checked), so no site outweighs the others by reporting a larger count; a
non-finite or missing figure is left out.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping

from .config import FederatedEvaluationConfig
from .selection import derive_seed

EVAL_PREFIX = "eval_"
EVAL_EXAMPLES = "eval_examples"
FEDERATED_PREFIX = "federated_"


def eval_report(metrics: Mapping[str, float], examples: int) -> dict[str, float]:
    """What a site sends: each metric as ``eval_<name>``, and ``eval_examples``."""
    report = {f"{EVAL_PREFIX}{name}": float(value) for name, value in metrics.items()}
    report[EVAL_EXAMPLES] = float(examples)
    return report


def is_eval_key(name: str) -> bool:
    return name.startswith(EVAL_PREFIX)


def site_eval(metrics: Mapping[str, float]) -> tuple[dict[str, float], float]:
    """A site's reported evaluation: ``({metric: value}, examples)``; examples 0 when the
    site evaluated nothing (or reported no usable count)."""
    examples = metrics.get(EVAL_EXAMPLES, 0.0)
    if not math.isfinite(examples) or examples <= 0:
        return {}, 0.0
    values = {
        name[len(EVAL_PREFIX) :]: float(value)
        for name, value in metrics.items()
        if is_eval_key(name) and name != EVAL_EXAMPLES and math.isfinite(value)
    }
    return values, float(examples)


def federated_metrics(
    reports: Mapping[str, Mapping[str, float]], caps: Mapping[str, int] | None = None
) -> dict[str, float]:
    """Example-weighted means of the sites' reported figures (``reports``: site → the
    metrics it sent with its update), as ``federated_<metric>``, with
    ``federated_examples`` and ``federated_sites``. ``caps``: the most examples a site may
    count for (sites missing from it are not capped). Empty when no site evaluated."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    examples = 0.0
    sites = 0
    for site in sorted(reports):
        values, count = site_eval(reports[site])
        if caps is not None and site in caps:
            count = min(count, float(max(caps[site], 0)))
        if count <= 0 or not values:
            continue
        sites += 1
        examples += count
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + count * value
            weights[name] = weights.get(name, 0.0) + count
    if not sites:
        return {}
    result = {f"{FEDERATED_PREFIX}{name}": sums[name] / weights[name] for name in sorted(sums)}
    result[f"{FEDERATED_PREFIX}examples"] = examples
    result[f"{FEDERATED_PREFIX}sites"] = float(sites)
    return result


def per_site_metrics(reports: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``site.<site>.eval_<metric>`` for every site that evaluated (MLflow keys)."""
    logged: dict[str, float] = {}
    for site in sorted(reports):
        values, count = site_eval(reports[site])
        if count <= 0:
            continue
        logged[f"site.{site}.{EVAL_EXAMPLES}"] = count
        for name, value in values.items():
            logged[f"site.{site}.{EVAL_PREFIX}{name}"] = value
    return logged


def without_eval(metrics: Mapping[str, float]) -> dict[str, float]:
    """A site's round metrics without its evaluation figures (those belong to the
    previous round's model)."""
    return {name: value for name, value in metrics.items() if not is_eval_key(name)}


def evaluating_sites(
    selected: Iterable[str], config: FederatedEvaluationConfig, seed: int, round_: int
) -> list[str]:
    """Which of round ``round_``'s sites evaluate the model they receive (round − 1's):
    none unless that model's round is evaluated; else ``ceil(fraction·n)`` of them (at
    least one), sampled reproducibly by round."""
    if not config.evaluates(round_ - 1):
        return []
    return sample_evaluators(selected, config.fraction, seed, round_)


def sample_evaluators(sites: Iterable[str], fraction: float, seed: int, round_: int) -> list[str]:
    """``ceil(fraction·n)`` of ``sites`` (at least one), sampled reproducibly by round."""
    pool = sorted(sites)
    if not pool:
        return []
    wanted = max(1, math.ceil(fraction * len(pool) - 1e-9))
    if wanted >= len(pool):
        return pool
    return sorted(random.Random(derive_seed(seed, "evaluate", round_)).sample(pool, wanted))
