"""Per-site reputation within a training run: strikes for updates that were clipped,
rejected, or left out by a robust aggregator, over each site's latest updates.

A site gets one entry per round in which its update reached the coordinator's checks
(accepted or rejected); the entry is a strike when the update was rejected (it failed
validation), clipped (its norm was cut back) or not selected by Krum / Multi-Krum. Only
the site's last ``window`` entries count. With ``flag_at`` strikes a site is *flagged*;
with ``max_strikes`` it is *left out* of every later round of the run. A site that is left
out sends no more updates, so it stays out until the run ends; a new run starts with a
clean record. Sites are never left out below the quorum: when leaving out every site past
the threshold would leave fewer than ``selection.min_sites`` eligible, those with the most
strikes (then by name) are left out and the others stay, flagged.

An update that could not be read (an object-store error) or that missed its deadline is
no strike: those are faults of the link, not of the update.

The record is part of the run's checkpointed state (under :data:`STATE_KEY` in the
strategy state JSON), so a resumed run keeps it and decides exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .config import ReputationConfig

STATE_KEY = "reputation"


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the strategy's own state, the reputation record's state or ``None``)."""
    rest = {key: value for key, value in state.items() if key != STATE_KEY}
    return rest, state.get(STATE_KEY)


class Reputation:
    """The strike record of one run's sites."""

    def __init__(
        self, config: ReputationConfig, history: Mapping[str, Iterable[Iterable[int]]] | None = None
    ) -> None:
        self.config = config
        # site → [[round, strike (0 or 1)], …], oldest first, at most `window` entries
        self.history: dict[str, list[list[int]]] = {
            site: [[int(r), int(s)] for r, s in entries][-config.window :]
            for site, entries in (history or {}).items()
        }

    @classmethod
    def from_state(cls, config: ReputationConfig, state: Mapping[str, Any]) -> Reputation:
        """The record in a checkpoint's strategy state (empty before the first round)."""
        _, record = split_state(state)
        if record is None:
            return cls(config)
        if not isinstance(record, Mapping) or not isinstance(record.get("sites"), Mapping):
            raise ValueError(f"checkpointed reputation record is malformed: {record!r:.200}")
        return cls(config, record["sites"])

    def state(self) -> dict[str, Any]:
        """JSON for the checkpoint: ``{"sites": {site: [[round, strike], …]}}``."""
        return {
            "sites": {site: [list(e) for e in self.history[site]] for site in sorted(self.history)}
        }

    def with_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """``state`` (a strategy's) with this record put in."""
        return {**state, STATE_KEY: self.state()}

    def record(self, round_: int, updates: Iterable[str], struck: Iterable[str]) -> None:
        """One round: every site whose update was checked, and those among them struck."""
        struck = set(struck)
        checked = set(updates)
        unknown = sorted(struck - checked)
        if unknown:
            raise ValueError(f"strikes for sites without an update this round: {unknown}")
        for site in sorted(checked):
            entries = [e for e in self.history.get(site, []) if e[0] != round_]
            entries.append([round_, int(site in struck)])
            self.history[site] = entries[-self.config.window :]

    def strikes(self, site: str) -> int:
        return sum(strike for _, strike in self.history.get(site, []))

    def updates(self, site: str) -> int:
        return len(self.history.get(site, []))

    def flagged(self) -> list[str]:
        """Sites with at least ``flag_at`` strikes in their window, sorted."""
        return sorted(s for s in self.history if self.strikes(s) >= self.config.flag_at)

    def over_threshold(self) -> list[str]:
        """Sites with at least ``max_strikes`` strikes (none if ``max_strikes`` is null)."""
        limit = self.config.max_strikes
        if limit is None:
            return []
        return sorted(s for s in self.history if self.strikes(s) >= limit)

    def reason(self, site: str) -> str:
        return (
            f"left out: {self.strikes(site)} of its last {self.updates(site)} updates were "
            "clipped, rejected or discarded"
        )

    def left_out(self, eligible: Iterable[str], min_sites: int) -> dict[str, str]:
        """The eligible sites to leave out of the next round, each with its reason; never
        so many that fewer than ``min_sites`` remain."""
        eligible = list(eligible)
        candidates = [s for s in self.over_threshold() if s in set(eligible)]
        room = max(len(eligible) - min_sites, 0)
        if len(candidates) > room:
            candidates = sorted(candidates, key=lambda s: (-self.strikes(s), s))[:room]
        return {site: self.reason(site) for site in sorted(candidates)}

    def metrics(self, sites: Iterable[str]) -> dict[str, float]:
        """``site.<site>.strikes`` for ``sites`` (MLflow, per round): the sites just recorded.

        A site's strikes change only when one of its updates is recorded, so logging the
        others again each round would add no point to their series, only rows (one per
        site of the federation per round: most of a round's logging at 1,000 sites)."""
        return {
            f"site.{site}.strikes": float(self.strikes(site))
            for site in sorted(set(sites))
            if site in self.history
        }

    def summary(self) -> dict[str, dict[str, Any]]:
        """Flagged sites for result.json and the lineage: their strikes, the updates those
        are out of, and whether they are past ``max_strikes`` (left out, quorum allowing)."""
        past = set(self.over_threshold())
        return {
            site: {
                "strikes": self.strikes(site),
                "updates": self.updates(site),
                "past_threshold": site in past,
            }
            for site in self.flagged()
        }
