"""The append-only audit log of model lifecycle actions: who did what, when, and why.

Every promotion, canary, rejection, rollback and lock takeover appends one entry: a JSON
line in its own object, ``<federation>/audit/<sequence>.jsonl``. Appending is a
conditional create of the next sequence number, so concurrent writers never overwrite
each other: the loser of a race takes the following number. Entries are never rewritten;
each carries the SHA-256 of the entry before it, so a removed or edited entry breaks the
chain (:meth:`AuditLog.verify`). ``fedround audit`` prints the log as JSON lines.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fedround.tasks.core import keys
from fedround.tasks.core.errors import FedroundError, ObjectNotFound
from fedround.tasks.core.serialization import sha256_hex
from fedround.tasks.locks import default_holder
from fedround.tasks.object_store import ObjectStore

log = logging.getLogger(__name__)

ACTIONS = (
    "canary",
    "promote",
    "reject",
    "rollback",
    "lock-takeover",
)


class AuditError(FedroundError):
    """The audit log could not be written, or it fails its integrity check."""


class AuditEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    sequence: int
    at: datetime
    actor: str
    action: str
    model: str
    version: str | None = None
    semver: str | None = None
    previous_production: str | None = None
    reason: str = ""
    details: dict[str, Any] = Field(default_factory=dict)
    prefect_flow_run_id: str | None = None
    config_revision: str | None = None
    previous_sha256: str | None = None


def _flow_run_id() -> str | None:
    try:
        from prefect import runtime

        found = runtime.flow_run.id
    except Exception:  # outside Prefect, or Prefect unavailable
        found = None
    return str(found) if found else os.environ.get("PREFECT__FLOW_RUN_ID")


class AuditLog:
    """The audit log of one federation."""

    def __init__(self, store: ObjectStore, federation: str) -> None:
        self.store = store
        self.federation = federation
        self.prefix = keys.audit_prefix(federation)

    def _keys(self) -> list[str]:
        return [k for k in self.store.list(self.prefix) if k.endswith(".jsonl")]

    def append(
        self,
        action: str,
        model: str,
        *,
        version: str | None = None,
        semver: str | None = None,
        previous_production: str | None = None,
        reason: str = "",
        details: dict[str, Any] | None = None,
        config_revision: str | None = None,
        actor: str | None = None,
        attempts: int = 50,
    ) -> AuditEntry:
        """Append one entry; returns it with its sequence number."""
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}; one of {ACTIONS}")
        for _ in range(attempts):
            existing = self._keys()
            sequence = int(existing[-1].rsplit("/", 1)[-1].split(".")[0]) + 1 if existing else 1
            previous = self.store.get(existing[-1]) if existing else None
            entry = AuditEntry(
                sequence=sequence,
                at=datetime.now(UTC),
                actor=actor or default_holder(),
                action=action,
                model=model,
                version=version,
                semver=semver,
                previous_production=previous_production,
                reason=reason,
                details=details or {},
                prefect_flow_run_id=_flow_run_id(),
                config_revision=config_revision,
                previous_sha256=sha256_hex(previous) if previous is not None else None,
            )
            line = entry.model_dump_json().encode() + b"\n"
            if self.store.create(keys.audit_entry_key(self.federation, sequence), line):
                log.info("audit #%d: %s %s v%s: %s", sequence, action, model, version, reason)
                return entry
        raise AuditError(
            f"could not append to the audit log {self.store.uri(self.prefix)} after {attempts} "
            "attempts (too many concurrent writers?)"
        )

    def raw_lines(self) -> list[bytes]:
        lines = []
        for key in self._keys():
            try:
                lines.append(self.store.get(key))
            except ObjectNotFound:
                continue
        return lines

    def entries(self, model: str | None = None, version: str | None = None) -> list[AuditEntry]:
        found = [AuditEntry.model_validate_json(line) for line in self.raw_lines()]
        return [
            e
            for e in found
            if (model is None or e.model == model) and (version is None or e.version == version)
        ]

    def verify(self) -> list[str]:
        """Problems with the log's integrity: gaps in the sequence or a broken hash chain."""
        problems = []
        previous: bytes | None = None
        for expected, line in enumerate(self.raw_lines(), start=1):
            entry = AuditEntry.model_validate_json(line)
            if entry.sequence != expected:
                problems.append(f"entry {expected} is missing (found {entry.sequence} next)")
            digest = sha256_hex(previous) if previous is not None else None
            if entry.previous_sha256 != digest:
                problems.append(f"entry {entry.sequence} does not chain to the entry before it")
            previous = line
        return problems

    def to_jsonl(self, model: str | None = None) -> str:
        return "".join(
            json.dumps(e.model_dump(mode="json"), sort_keys=True) + "\n"
            for e in self.entries(model)
        )
