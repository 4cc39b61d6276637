"""Promotion gates: may a candidate model replace the production model?

Inputs are per-site evaluations of both models on each site's own held-out data (only
metrics ever leave a site). The gates, in the order they are reported:

1. ``quorum``: at least ``min_sites`` sites evaluated the candidate;
2. ``global_gain``: the global metric (example-weighted over the sites that evaluated both
   models) beats production by at least δ (``min_gain``);
3. ``site_regression``: no site is worse than under production by more than ε
   (``max_site_drop``);
4. ``site_floor``: the worst site's metric is at least the floor (at most, for a metric
   where lower is better).

The metric is any one the sites report (``promotion.metric``, by default
``evaluation.metric``); its direction (``higher`` or ``lower`` is better) comes from the
federation config (:meth:`~fedround.tasks.core.config.FederationConfig.metric_direction`).
"Gain" and "drop" are measured in that direction: for ``mae`` a gain is a fall.

With no production model yet (the first promotion) only the quorum and floor gates apply:
there is nothing to compare with, and the decision says so. Pure functions, exact tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import PromotionConfig

# Figures are compared with this slack so that 0.93 >= 0.91 + 0.02 holds in floating point.
TOLERANCE = 1e-9

QUORUM = "quorum"
GLOBAL_GAIN = "global_gain"
SITE_REGRESSION = "site_regression"
SITE_FLOOR = "site_floor"


@dataclass(frozen=True)
class SiteMetric:
    """One model's metric at one site, with the number of examples it was measured on."""

    value: float
    num_examples: int


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    first_production: bool
    metric: str
    direction: str
    gates: list[GateResult]
    global_candidate: float | None
    global_production: float | None
    sites: dict[str, dict[str, float | None]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [g.gate for g in self.gates if not g.passed]

    def summary(self) -> str:
        if self.passed:
            head = "first production model" if self.first_production else "all gates passed"
        else:
            head = "failed " + ", ".join(self.failed)
        details = "; ".join(g.detail for g in self.gates if not g.passed or self.passed)
        return f"{head}: {details}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["failed"] = self.failed
        return data


def weighted_mean(metrics: Mapping[str, SiteMetric], sites: list[str]) -> float | None:
    total = sum(metrics[s].num_examples for s in sites)
    if not sites or total <= 0:
        return None
    return sum(metrics[s].value * metrics[s].num_examples for s in sites) / total


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def decide(
    candidate: Mapping[str, SiteMetric],
    production: Mapping[str, SiteMetric] | None,
    policy: PromotionConfig,
    min_sites: int,
    unavailable: Mapping[str, str] | None = None,
    *,
    metric: str,
    direction: str,
) -> GateDecision:
    """Apply the gates of ``policy`` to the sites' figures for ``metric`` (``direction``:
    ``higher`` or ``lower`` is better); ``production`` is ``None`` when there is none yet."""
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be 'higher' or 'lower', got {direction!r}")
    up = direction == "higher"
    sign = 1.0 if up else -1.0
    name = metric
    gates: list[GateResult] = []
    evaluated = sorted(candidate)
    gates.append(
        GateResult(
            QUORUM,
            len(evaluated) >= min_sites,
            f"{len(evaluated)} sites evaluated the candidate, at least {min_sites} required",
        )
    )
    paired = sorted(s for s in evaluated if production is not None and s in production)
    global_candidate = weighted_mean(candidate, paired if production is not None else evaluated)
    global_production = weighted_mean(production, paired) if production is not None else None
    sites: dict[str, dict[str, float | None]] = {}
    for site in sorted(set(candidate) | set(production or {})):
        cand = candidate[site].value if site in candidate else None
        prod = production[site].value if production is not None and site in production else None
        sites[site] = {
            "candidate": cand,
            "production": prod,
            "change": None if cand is None or prod is None else cand - prod,
            "examples": float(candidate[site].num_examples if site in candidate else 0),
        }
    if production is not None:
        if global_candidate is None or global_production is None:
            gates.append(
                GateResult(GLOBAL_GAIN, False, "no site evaluated both candidate and production")
            )
        else:
            gain = sign * (global_candidate - global_production)
            gates.append(
                GateResult(
                    GLOBAL_GAIN,
                    gain + TOLERANCE >= policy.min_gain,
                    f"global {name} {_fmt(global_candidate)} vs production "
                    f"{_fmt(global_production)}: gain {gain:+.4f}, at least "
                    f"{policy.min_gain:+.4f} required",
                )
            )
        drops = {s: sign * (production[s].value - candidate[s].value) for s in paired}
        worse = {s: d for s, d in drops.items() if d > policy.max_site_drop + TOLERANCE}
        worst_site = max(drops, key=lambda s: drops[s]) if drops else None
        detail = (
            f"largest site drop {drops[worst_site]:+.4f} at {worst_site}"
            if worst_site is not None
            else "no site evaluated both models"
        )
        if worse:
            detail = "worse than production by more than ε: " + ", ".join(
                f"{s} {candidate[s].value:.4f} vs {production[s].value:.4f}" for s in sorted(worse)
            )
        gates.append(
            GateResult(
                SITE_REGRESSION,
                not worse and bool(drops),
                f"{detail} (ε={policy.max_site_drop:.4f})",
            )
        )
    if policy.site_floor is not None:
        values = {s: candidate[s].value for s in evaluated}
        worst = (min if up else max)(values, key=lambda s: values[s]) if values else None
        ok = worst is not None and sign * (values[worst] - policy.site_floor) + TOLERANCE >= 0
        bound = "at least" if up else "at most"
        gates.append(
            GateResult(
                SITE_FLOOR,
                ok,
                f"worst site {worst} {name} {_fmt(values.get(worst) if worst else None)}, "
                f"{bound} {policy.site_floor:.4f} required",
            )
        )
    return GateDecision(
        passed=all(g.passed for g in gates),
        first_production=production is None,
        metric=name,
        direction=direction,
        gates=gates,
        global_candidate=global_candidate,
        global_production=global_production,
        sites=sites,
        unavailable=dict(unavailable or {}),
    )
