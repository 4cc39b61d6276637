"""Registry state changes of the model lifecycle, each one audited.

A version moves ``candidate`` → (``canary``) → ``production`` → ``deprecated``, or to
``rejected`` (a gate failed) or ``rolled_back``. Each change is written under the
promotion lock (:mod:`fedround.tasks.locks`), which is verified right before the decisive
registry write; the audit entry follows that write. Aliases:

- ``production``: the model everyone serves (``models:/<name>@production``);
- ``production-<site>``: a canary site's model during a staged rollout (a site resolves
  its own alias first and falls back to ``production``);
- ``deprecated``: the production version before the current one;
- ``candidate``: the newest registered version not yet decided (removed on promotion).

The registered model's tag ``fedround.production_history`` lists every production version
in order; rollback walks it backwards.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fedround.tasks.audit import AuditEntry, AuditLog
from fedround.tasks.core.errors import FedroundError
from fedround.tasks.locks import Lock
from fedround.tasks.registry import (
    CANDIDATE,
    DEPRECATED,
    PRODUCTION,
    TAG,
    ModelRegistry,
    site_alias,
)

log = logging.getLogger(__name__)

STATUS = f"{TAG}status"
ROLLOUT = f"{TAG}rollout"


class LifecycleError(FedroundError):
    """A promotion or rollback cannot proceed; the message says why and what to do."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Lifecycle:
    """Writes registry changes for one model, under a held lock, into the audit log."""

    registry: ModelRegistry
    audit: AuditLog
    lock: Lock
    config_revision: str | None = None

    @property
    def model(self) -> str:
        return self.registry.name

    def _semver(self, version: str) -> str | None:
        return self.registry.get(version).tags.get(f"{TAG}semver")

    def canary_aliases(self) -> dict[str, str]:
        prefix = site_alias("")
        return {a: v for a, v in self.registry.aliases().items() if a.startswith(prefix)}

    # --- outcomes of a promotion ---------------------------------------------------

    def reject(
        self,
        version: str,
        gate: str,
        reason: str,
        figures: dict[str, Any],
        previous_production: str | None,
        stage: str,
    ) -> AuditEntry:
        """Tag the version with the gate that failed and the figures; production stays."""
        self.lock.verify()
        tags = {
            STATUS: "rejected",
            f"{TAG}gate_failed": gate,
            f"{TAG}gate_figures": json.dumps(figures, sort_keys=True, default=str),
            f"{TAG}rejected_at": _now(),
            f"{TAG}compared_with": previous_production or "none",
        }
        if stage == "complete-rollout":
            for alias in self.canary_aliases():
                self.registry.delete_alias(alias)
            tags[ROLLOUT] = "aborted"
        self.registry.set_tags(version, tags)
        return self.audit.append(
            "reject",
            self.model,
            version=version,
            semver=self._semver(version),
            previous_production=previous_production,
            reason=reason,
            details={"stage": stage, "gate": gate, "figures": figures},
            config_revision=self.config_revision,
        )

    def start_canary(
        self,
        version: str,
        sites: list[str],
        figures: dict[str, Any],
        previous_production: str | None,
    ) -> AuditEntry:
        """Point the canary sites' aliases at ``version``; everyone else keeps production."""
        self.lock.verify()
        for site in sites:
            self.registry.set_alias(site_alias(site), version)
        entry = self.audit.append(
            "canary",
            self.model,
            version=version,
            semver=self._semver(version),
            previous_production=previous_production,
            reason=f"gates passed; canary at {', '.join(sites)}",
            details={"stage": "canary", "sites": sites, "figures": figures},
            config_revision=self.config_revision,
        )
        self.registry.set_tags(
            version,
            {
                STATUS: "canary",
                ROLLOUT: "canary",
                f"{TAG}canary_sites": ",".join(sites),
                f"{TAG}canary_started_at": _now(),
                f"{TAG}gate_figures": json.dumps(figures, sort_keys=True, default=str),
            },
        )
        return entry

    def make_production(
        self,
        version: str,
        previous_production: str | None,
        reason: str,
        figures: dict[str, Any],
        stage: str,
    ) -> AuditEntry:
        """``version`` becomes production; the previous production becomes deprecated."""
        self.lock.verify()
        self.registry.set_alias(PRODUCTION, version)
        entry = self.audit.append(
            "promote",
            self.model,
            version=version,
            semver=self._semver(version),
            previous_production=previous_production,
            reason=reason,
            details={"stage": stage, "figures": figures},
            config_revision=self.config_revision,
        )
        now = _now()
        self.registry.set_tags(
            version,
            {
                STATUS: PRODUCTION,
                ROLLOUT: "complete",
                f"{TAG}promoted_at": now,
                f"{TAG}promoted_by": entry.actor,
                f"{TAG}gate_figures": json.dumps(figures, sort_keys=True, default=str),
            },
        )
        if previous_production is not None:
            self.registry.set_alias(DEPRECATED, previous_production)
            self.registry.set_tags(
                previous_production,
                {STATUS: DEPRECATED, f"{TAG}deprecated_at": now, f"{TAG}superseded_by": version},
            )
        if self.registry.aliases().get(CANDIDATE) == version:
            self.registry.delete_alias(CANDIDATE)
        for alias in self.canary_aliases():
            self.registry.delete_alias(alias)
        history = self.registry.production_history()
        if not history and previous_production is not None:
            history = [previous_production]
        self.registry.set_production_history([*history, version])
        return entry

    # --- rollback --------------------------------------------------------------------

    def roll_back(self, reason: str) -> AuditEntry:
        """Abort a canary in progress, else restore the previous production version."""
        aliases = self.registry.aliases()
        production = aliases.get(PRODUCTION)
        canary = {a: v for a, v in self.canary_aliases().items() if v != production}
        if canary:
            version = next(iter(canary.values()))
            self.lock.verify()
            for alias in canary:
                self.registry.delete_alias(alias)
            entry = self.audit.append(
                "rollback",
                self.model,
                version=version,
                semver=self._semver(version),
                previous_production=production,
                reason=reason or "canary rolled back",
                details={"stage": "canary", "aliases_removed": sorted(canary)},
                config_revision=self.config_revision,
            )
            self.registry.set_tags(
                version,
                {STATUS: "rolled_back", ROLLOUT: "rolled_back", f"{TAG}rolled_back_at": _now()},
            )
            return entry
        if production is None:
            raise LifecycleError(f"nothing to roll back: {self.model} has no production version")
        history = [v for v in self.registry.production_history() if v != production]
        if not history and aliases.get(DEPRECATED):
            history = [aliases[DEPRECATED]]
        usable = [v for v in history if self.registry.get(v).tags.get(STATUS) != "rolled_back"]
        if not usable:
            raise LifecycleError(
                f"no earlier production version of {self.model} to roll back to "
                f"(version {production} is the first)"
            )
        target = usable[-1]
        self.registry.verify(target)  # never restore a model whose artifacts are broken
        self.lock.verify()
        self.registry.set_alias(PRODUCTION, target)
        entry = self.audit.append(
            "rollback",
            self.model,
            version=target,
            semver=self._semver(target),
            previous_production=production,
            reason=reason or f"rolled back from version {production}",
            details={"stage": "production", "from": production, "to": target},
            config_revision=self.config_revision,
        )
        now = _now()
        self.registry.set_tags(
            production,
            {STATUS: "rolled_back", f"{TAG}rolled_back_at": now, f"{TAG}rolled_back_to": target},
        )
        self.registry.set_tags(target, {STATUS: PRODUCTION, f"{TAG}restored_at": now})
        remaining = history[: history.index(target) + 1]
        self.registry.set_production_history(remaining)
        before = [v for v in remaining[:-1] if v != target]
        if before:
            self.registry.set_alias(DEPRECATED, before[-1])
        else:
            self.registry.delete_alias(DEPRECATED)
        return entry
