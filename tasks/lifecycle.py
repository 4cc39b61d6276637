"""Registry state changes of the model lifecycle, each one audited.

A version moves ``candidate`` → (``canary``) → ``production`` → ``deprecated``, or to
``rejected`` (a gate failed) or ``rolled_back``. Each change is written under the
promotion lock (:mod:`fedround.tasks.locks`), which is verified right before the decisive
registry write. Every change that moves an alias is written in three steps:

1. an ``intent`` entry in the audit log: the action, the version, the aliases it will set
   (or remove), and the completion entry's content;
2. the alias writes, then the tags, the deprecated alias and the production history (each
   step idempotent: writing it again changes nothing);
3. the completion entry (``promote``, ``canary``, ``rollback``, ``reject``), which names
   its intent (``details.intent``).

A process that dies in between leaves an intent without a completion. The next promotion
or rollback (under the same lock), and ``fedround promote --repair``, reconcile it
(:meth:`Lifecycle.reconcile`) from the registry's actual aliases: if any of its aliases
moved, the action is finished (steps 2 and 3 again, the entry marked ``repaired``); if none
did, an ``abandon`` entry records that nothing changed. Aliases:

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

from fedround.tasks.audit import ABANDON, INTENT, AuditEntry, AuditLog, pending_intents
from fedround.tasks.core.errors import FedroundError
from fedround.tasks.locks import Lock, break_lock, default_holder
from fedround.tasks.object_store import ObjectStore
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

    # --- the three steps of every alias change ------------------------------------

    def _intend(
        self,
        action: str,
        version: str,
        previous_production: str | None,
        aliases: dict[str, str | None],
        reason: str,
        details: dict[str, Any],
    ) -> AuditEntry:
        """Step 1: record what is about to change (``None``: the alias is removed)."""
        self.lock.verify()
        return self.audit.append(
            INTENT,
            self.model,
            version=version,
            semver=self._semver(version),
            previous_production=previous_production,
            reason=f"about to {action}: {reason}",
            details={"intends": action, "aliases": aliases, "reason": reason, "then": details},
            config_revision=self.config_revision,
        )

    def _apply(self, intent: AuditEntry) -> None:
        """Step 2a: the intent's alias writes (again, on a repair: they are idempotent)."""
        aliases: dict[str, str | None] = intent.details.get("aliases", {})
        self.lock.verify()
        for alias, version in aliases.items():
            if version is None:
                self.registry.delete_alias(alias)
            else:
                self.registry.set_alias(alias, version)

    def _finish(self, intent: AuditEntry, repaired: bool = False) -> AuditEntry:
        """Step 2b and 3: the follow-up registry writes, then the completion entry."""
        action = str(intent.details["intends"])
        version = str(intent.version)
        details: dict[str, Any] = dict(intent.details.get("then", {}))
        previous = intent.previous_production
        if action == "promote":
            self._after_promote(version, previous, details.get("figures", {}))
        elif action == "canary":
            self._after_canary(version, details.get("sites", []), details.get("figures", {}))
        elif action == "rollback" and details.get("stage") == "canary":
            self._set_tags(
                version,
                {STATUS: "rolled_back", ROLLOUT: "rolled_back", f"{TAG}rolled_back_at": _now()},
            )
        elif action == "rollback":
            self._after_rollback(str(details["from"]), version)
        elif action == "reject":
            self._set_tags(version, {ROLLOUT: "aborted"})
        reason = str(intent.details.get("reason", ""))
        if repaired:
            reason += (
                f" (completed by a repair: intent #{intent.sequence} was left half-done, "
                "its alias had moved)"
            )
        return self.audit.append(
            action,
            self.model,
            version=version,
            semver=intent.semver,
            previous_production=previous,
            reason=reason,
            details={
                **details,
                "intent": intent.sequence,
                **({"repaired": True} if repaired else {}),
            },
            config_revision=self.config_revision,
        )

    def _set_tags(self, version: str, tags: dict[str, str]) -> None:
        self.registry.set_tags(version, tags)

    def pending(self) -> list[AuditEntry]:
        """Intents of this model without a completion (a promotion or rollback that died)."""
        return pending_intents(self.audit.entries(self.model))

    def reconcile(self) -> list[AuditEntry]:
        """Finish or abandon every half-done change of this model (see the module
        docstring); returns the entries written. Call it holding the lock."""
        written = []
        for intent in self.pending():
            self.lock.verify()
            wanted: dict[str, str | None] = intent.details.get("aliases", {})
            now = self.registry.aliases()
            found = {alias: now.get(alias) for alias in wanted}
            moved = sorted(alias for alias, version in wanted.items() if found[alias] == version)
            if moved:
                log.warning(
                    "audit intent #%d (%s %s v%s) was left half-done with %s moved: finishing it",
                    intent.sequence,
                    intent.details.get("intends"),
                    self.model,
                    intent.version,
                    ", ".join(moved),
                )
                self._apply(intent)
                written.append(self._finish(intent, repaired=True))
                continue
            log.warning(
                "audit intent #%d (%s %s v%s) stopped before any alias moved: recording that "
                "nothing changed",
                intent.sequence,
                intent.details.get("intends"),
                self.model,
                intent.version,
            )
            written.append(
                self.audit.append(
                    ABANDON,
                    self.model,
                    version=intent.version,
                    semver=intent.semver,
                    previous_production=intent.previous_production,
                    reason=(
                        f"intent #{intent.sequence} ({intent.details.get('intends')}) stopped "
                        "before any alias moved: nothing changed"
                    ),
                    details={"intent": intent.sequence, "aliases_found": found},
                    config_revision=self.config_revision,
                )
            )
        return written

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
            tags[ROLLOUT] = "aborted"
        self.registry.set_tags(version, tags)
        details = {"stage": stage, "gate": gate, "figures": figures}
        canary = self.canary_aliases() if stage == "complete-rollout" else {}
        if canary:  # the canary sites go back to production: an alias change
            intent = self._intend(
                "reject",
                version,
                previous_production,
                dict.fromkeys(canary),
                reason,
                details,
            )
            self._apply(intent)
            return self._finish(intent)
        return self.audit.append(
            "reject",
            self.model,
            version=version,
            semver=self._semver(version),
            previous_production=previous_production,
            reason=reason,
            details=details,
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
        intent = self._intend(
            "canary",
            version,
            previous_production,
            {site_alias(site): version for site in sites},
            f"gates passed; canary at {', '.join(sites)}",
            {"stage": "canary", "sites": sites, "figures": figures},
        )
        self._apply(intent)
        return self._finish(intent)

    def _after_canary(self, version: str, sites: list[str], figures: dict[str, Any]) -> None:
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

    def make_production(
        self,
        version: str,
        previous_production: str | None,
        reason: str,
        figures: dict[str, Any],
        stage: str,
    ) -> AuditEntry:
        """``version`` becomes production; the previous production becomes deprecated."""
        intent = self._intend(
            "promote",
            version,
            previous_production,
            {PRODUCTION: version},
            reason,
            {"stage": stage, "figures": figures},
        )
        self._apply(intent)
        return self._finish(intent)

    def _after_promote(
        self, version: str, previous_production: str | None, figures: dict[str, Any]
    ) -> None:
        now = _now()
        self.registry.set_tags(
            version,
            {
                STATUS: PRODUCTION,
                ROLLOUT: "complete",
                f"{TAG}promoted_at": now,
                f"{TAG}promoted_by": default_holder(),
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
        if not history or history[-1] != version:  # a repair may run this twice
            self.registry.set_production_history([*history, version])

    # --- rollback --------------------------------------------------------------------

    def roll_back(self, reason: str) -> AuditEntry:
        """Abort a canary in progress, else restore the previous production version."""
        aliases = self.registry.aliases()
        production = aliases.get(PRODUCTION)
        canary = {a: v for a, v in self.canary_aliases().items() if v != production}
        if canary:
            version = next(iter(canary.values()))
            intent = self._intend(
                "rollback",
                version,
                production,
                dict.fromkeys(canary),
                reason or "canary rolled back",
                {"stage": "canary", "aliases_removed": sorted(canary)},
            )
            self._apply(intent)
            return self._finish(intent)
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
        intent = self._intend(
            "rollback",
            target,
            production,
            {PRODUCTION: target},
            reason or f"rolled back from version {production}",
            {"stage": "production", "from": production, "to": target},
        )
        self._apply(intent)
        return self._finish(intent)

    def _after_rollback(self, production: str, target: str) -> None:
        """Tags, production history and deprecated alias after ``production`` → ``target``."""
        now = _now()
        self.registry.set_tags(
            production,
            {STATUS: "rolled_back", f"{TAG}rolled_back_at": now, f"{TAG}rolled_back_to": target},
        )
        self.registry.set_tags(target, {STATUS: PRODUCTION, f"{TAG}restored_at": now})
        history = [v for v in self.registry.production_history() if v != production]
        if target not in history:
            history.append(target)
        remaining = history[: history.index(target) + 1]
        self.registry.set_production_history(remaining)
        before = [v for v in remaining[:-1] if v != target]
        if before:
            self.registry.set_alias(DEPRECATED, before[-1])
        else:
            self.registry.delete_alias(DEPRECATED)


def break_lock_audited(
    store: ObjectStore, audit: AuditLog, name: str, reason: str, actor: str | None = None
) -> AuditEntry:
    """Break the federation's lock ``name`` (``promotion-<model>``, ``run-<run id>``) whose
    holder is gone, and audit who broke whose lock and why. Refuses without a reason."""
    from fedround.tasks.core import keys

    key = keys.lock_key(audit.federation, name)
    broken = break_lock(store, key, reason)
    model = name.removeprefix("promotion-") if name.startswith("promotion-") else ""
    return audit.append(
        "lock-break",
        model,
        reason=reason,
        details={"lock": name, "uri": store.uri(key), "broken_lock": broken},
        actor=actor,
    )
