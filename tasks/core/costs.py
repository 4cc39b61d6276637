"""Cost accounting of a training run: compute seconds and bytes moved, per site and tenant.

Inputs are the per-round, per-site figures the coordinator tracks (``site.<site>.seconds``,
``site.<site>.bytes_up``, ``site.<site>.bytes_down``); a round that ran twice (a crash,
then a resume) counts twice, because both attempts were paid for. A federation belongs
to one tenant, so the tenant's cost is the sum over its sites; the coordinator's own
seconds are kept apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

SITE_FIGURES = {"seconds": "compute_seconds", "bytes_up": "bytes_up", "bytes_down": "bytes_down"}


@dataclass(frozen=True)
class Cost:
    compute_seconds: float = 0.0
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    rounds: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.compute_seconds + other.compute_seconds,
            self.bytes_up + other.bytes_up,
            self.bytes_down + other.bytes_down,
            self.rounds + other.rounds,
        )


@dataclass(frozen=True)
class CostReport:
    tenant: str
    sites: dict[str, Cost]
    coordinator_seconds: float = 0.0
    currency_note: str = field(default="seconds and bytes; price them with your own rates")

    @property
    def tenant_total(self) -> Cost:
        total = Cost()
        for cost in self.sites.values():
            total = total + cost
        return total

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: ``cost.site.<site>.<figure>``, ``cost.tenant.<tenant>.*``."""
        flat: dict[str, float] = {"cost.coordinator.seconds": self.coordinator_seconds}
        owners = {f"site.{site}": cost for site, cost in self.sites.items()}
        owners[f"tenant.{self.tenant}"] = self.tenant_total
        for owner, cost in owners.items():
            flat[f"cost.{owner}.compute_seconds"] = cost.compute_seconds
            flat[f"cost.{owner}.bytes_up"] = cost.bytes_up
            flat[f"cost.{owner}.bytes_down"] = cost.bytes_down
        return flat

    def to_dict(self) -> dict[str, object]:
        def one(cost: Cost) -> dict[str, float]:
            return {
                "compute_seconds": round(cost.compute_seconds, 3),
                "bytes_up": cost.bytes_up,
                "bytes_down": cost.bytes_down,
                "rounds": cost.rounds,
            }

        return {
            "tenant": self.tenant,
            "sites": {site: one(cost) for site, cost in sorted(self.sites.items())},
            "tenant_total": one(self.tenant_total),
            "coordinator_seconds": round(self.coordinator_seconds, 3),
            "note": self.currency_note,
        }


def summarize(
    site_series: Mapping[str, Mapping[str, list[float]]],
    tenant: str,
    coordinator_seconds: float = 0.0,
) -> CostReport:
    """``site_series[site][figure]`` holds one value per round the site took part in."""
    sites = {}
    for site, series in site_series.items():
        sites[site] = Cost(
            compute_seconds=sum(series.get("seconds", [])),
            bytes_up=sum(series.get("bytes_up", [])),
            bytes_down=sum(series.get("bytes_down", [])),
            rounds=len(series.get("seconds", [])),
        )
    return CostReport(tenant=tenant, sites=sites, coordinator_seconds=coordinator_seconds)
