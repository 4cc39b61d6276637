"""The append-only audit log of model lifecycle actions: who did what, when, and why.

Every promotion, canary, rejection, rollback, lock takeover and lock break appends one
entry (a change of a registry alias two: its ``intent`` before, the outcome after, see
:mod:`fedround.tasks.lifecycle`), and so do every change of the sites' key registry and
every update rejected for its signature (:mod:`fedround.tasks.site_keys`): a JSON line in
its own object,
``<federation>/audit/<sequence>.jsonl``. Appending is a conditional create of the next
sequence number, so concurrent writers never overwrite each other: the loser of a race
takes the following number. Entries are never rewritten; each carries the SHA-256 of the
entry before it, so a removed or edited entry breaks the chain (:meth:`AuditLog.verify`).
``fedround audit`` prints the log as JSON lines.

The chain alone cannot tell a log whose last entries were deleted from a shorter one, so
every append also moves the log's *head*, ``<federation>/audit/head.json``: the sequence
number and SHA-256 of the newest entry. The head only moves forward (a compare-and-swap
that never replaces a newer head), and it is written after the entry, so it never points
past the log: a log that ends before its head, or whose entry at the head has other bytes,
lost its end or was rewritten. Entries written with a head say so (``anchored``), so a
deleted head is noticed too; a log from before heads existed gets one on its next append.
The head is a guard against mistakes (a truncating sync, a lifecycle rule, a wrong
``rm``), not against someone who can rewrite the bucket: they can rewrite the head as well.

A malformed line (not JSON, or missing a field) never stops a reader: ``verify`` reports
it and checks the rest, and listings skip it with a warning naming the object, so one bad
object neither hides the other entries nor goes unnoticed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedround.tasks.core import keys
from fedround.tasks.core.errors import FedroundError, ObjectNotFound, ObjectStoreError
from fedround.tasks.core.serialization import sha256_hex
from fedround.tasks.locks import default_holder
from fedround.tasks.object_store import ObjectStore

log = logging.getLogger(__name__)

INTENT = "intent"  # a lifecycle change about to be made (see tasks/lifecycle.py)
ABANDON = "abandon"  # an intent that stopped before it changed anything
ACTIONS = (
    "canary",
    "promote",
    "reject",
    "rollback",
    "lock-takeover",
    "lock-break",
    "key-register",  # the key registry (tasks/site_keys.py)
    "key-revoke",
    "update-rejected",  # an update that failed its signature check
    INTENT,
    ABANDON,
)
HEAD = "head.json"
_ENTRY_NAME = re.compile(r"^(\d+)\.jsonl$")


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
    # Written by a version that keeps head.json: from this entry on, the log must have one.
    anchored: bool = False


class AuditHead(BaseModel):
    """The newest entry of the log as of its last append (``head.json``)."""

    model_config = ConfigDict(frozen=True)

    sequence: int
    sha256: str
    at: datetime


@dataclass(frozen=True)
class StoredLine:
    """One stored entry: its position in the log, object key, bytes and parse result."""

    line: int  # 1-based position among the stored entries
    key: str
    sequence: int  # from the key's name
    raw: bytes
    entry: AuditEntry | None
    error: str | None  # why ``entry`` is None


@dataclass
class AuditCheck:
    """The result of :meth:`AuditLog.check`: problems fail the check, notes do not."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _parse(raw: bytes) -> tuple[AuditEntry | None, str | None]:
    """The entry in ``raw``, or ``None`` and what is wrong with it."""
    try:
        data = json.loads(raw)
    except ValueError as exc:  # also bytes that are not UTF-8
        return None, f"not valid JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"not a JSON object (a JSON {type(data).__name__})"
    try:
        return AuditEntry.model_validate(data), None
    except ValidationError as exc:
        reasons = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            if error["type"] == "missing":
                reasons.append(f"missing field {where!r}")
            else:
                reasons.append(f"field {where!r}: {error['msg']}")
        return None, "; ".join(reasons)


def _parse_head(raw: bytes) -> tuple[AuditHead | None, str | None]:
    try:
        return AuditHead.model_validate_json(raw), None
    except ValidationError as exc:
        return None, str(exc.errors()[0]["msg"])


def _flow_run_id() -> str | None:
    try:
        from prefect import runtime

        found = runtime.flow_run.id
    except Exception:  # outside Prefect, or Prefect unavailable
        found = None
    return str(found) if found else os.environ.get("PREFECT__FLOW_RUN_ID")


def pending_intents(entries: list[AuditEntry]) -> list[AuditEntry]:
    """The ``intent`` entries no later entry completes (``details.intent`` names its
    intent): lifecycle changes that stopped half-way, or are running now."""
    done = {e.details.get("intent") for e in entries if e.action != INTENT}
    return [e for e in entries if e.action == INTENT and e.sequence not in done]


def render_jsonl(entries: list[AuditEntry]) -> str:
    """Entries as JSON lines with sorted keys (what ``fedround audit`` prints)."""
    return "".join(json.dumps(e.model_dump(mode="json"), sort_keys=True) + "\n" for e in entries)


class AuditLog:
    """The audit log of one federation."""

    def __init__(self, store: ObjectStore, federation: str) -> None:
        self.store = store
        self.federation = federation
        self.prefix = keys.audit_prefix(federation)
        self.head_key = self.prefix + HEAD

    def _keys(self) -> list[tuple[int, str]]:
        """(sequence, key) of every stored entry, in sequence order."""
        found = []
        for key in self.store.list(self.prefix):
            match = _ENTRY_NAME.match(key[len(self.prefix) :])
            if match:
                found.append((int(match.group(1)), key))
        return sorted(found)

    def _head_bytes(self) -> bytes | None:
        try:
            return self.store.get(self.head_key)
        except ObjectNotFound:
            return None

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
        """Append one entry, then move the head to it; returns it with its sequence number.

        If the head records a later entry than the log holds (its end was deleted), the
        new entry is numbered after the head, so the gap stays in the log for
        :meth:`verify` to report instead of being filled in.
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}; one of {ACTIONS}")
        for _ in range(attempts):
            # The head first: it is only moved after an entry exists, so read before the
            # listing it can only be behind it, unless entries were deleted.
            head_bytes = self._head_bytes()
            head = _parse_head(head_bytes)[0] if head_bytes is not None else None
            existing = self._keys()
            last = existing[-1][0] if existing else 0
            if head is not None and head.sequence > last:
                log.warning(
                    "audit log %s ends at entry %d but its head records entry %d: entries "
                    "were deleted from its end; numbering continues after %d so that "
                    "`fedround audit --verify` keeps reporting the gap",
                    self.store.uri(self.prefix),
                    last,
                    head.sequence,
                    head.sequence,
                )
            sequence = max(last, head.sequence if head is not None else 0) + 1
            previous = self.store.get(existing[-1][1]) if existing else None
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
                anchored=True,
            )
            line = entry.model_dump_json().encode() + b"\n"
            if self.store.create(keys.audit_entry_key(self.federation, sequence), line):
                log.info("audit #%d: %s %s v%s: %s", sequence, action, model, version, reason)
                self._move_head(sequence, sha256_hex(line), attempts)
                return entry
        raise AuditError(
            f"could not append to the audit log {self.store.uri(self.prefix)} after {attempts} "
            "attempts (too many concurrent writers?)"
        )

    def _move_head(self, sequence: int, digest: str, attempts: int) -> None:
        """Point the head at entry ``sequence`` unless it already records a later one.

        The entry is written by now: failing here must not fail the append (a caller
        retrying it would log the action twice), and the next append moves the head.
        """
        new = AuditHead(sequence=sequence, sha256=digest, at=datetime.now(UTC))
        data = new.model_dump_json().encode() + b"\n"
        try:
            for _ in range(attempts):
                current = self._head_bytes()
                if current is None:
                    if self.store.create(self.head_key, data):
                        return
                    continue
                head, _error = _parse_head(current)
                if head is not None and head.sequence >= sequence:
                    return  # a concurrent append of a later entry moved it already
                if head is None:
                    log.warning(
                        "replacing the unreadable audit head %s", self.store.uri(self.head_key)
                    )
                if self.store.replace(self.head_key, data, expected=current):
                    return
        except ObjectStoreError as exc:
            log.warning(
                "audit entry #%d is written, but its head %s could not be moved (%s); the "
                "next append moves it",
                sequence,
                self.store.uri(self.head_key),
                exc,
            )
            return
        log.warning(
            "audit entry #%d is written, but its head %s could not be moved after %d "
            "attempts; the next append moves it",
            sequence,
            self.store.uri(self.head_key),
            attempts,
        )

    def stored_lines(self) -> list[StoredLine]:
        """Every stored entry with its parse result; an entry deleted meanwhile is left out."""
        lines: list[StoredLine] = []
        for sequence, key in self._keys():
            try:
                raw = self.store.get(key)
            except ObjectNotFound:
                continue
            entry, error = _parse(raw)
            lines.append(StoredLine(len(lines) + 1, key, sequence, raw, entry, error))
        return lines

    def raw_lines(self) -> list[bytes]:
        return [line.raw for line in self.stored_lines()]

    def _unreadable(self, line: StoredLine) -> str:
        return f"line {line.line} ({self.store.uri(line.key)}): {line.error}"

    def read(
        self, model: str | None = None, version: str | None = None
    ) -> tuple[list[AuditEntry], list[str]]:
        """The readable entries (of ``model`` / ``version``) and one message per malformed
        line, which is left out: whoever shows the entries should show the messages too."""
        found: list[AuditEntry] = []
        unreadable: list[str] = []
        for line in self.stored_lines():
            if line.entry is None:
                unreadable.append(self._unreadable(line))
            elif (model is None or line.entry.model == model) and (
                version is None or line.entry.version == version
            ):
                found.append(line.entry)
        return found, unreadable

    def entries(self, model: str | None = None, version: str | None = None) -> list[AuditEntry]:
        """The readable entries; a malformed line is skipped with a warning naming it
        (lineage and listings keep working; ``fedround audit --verify`` fails on it)."""
        found, unreadable = self.read(model, version)
        for message in unreadable:
            log.warning("skipping a malformed audit log entry: %s", message)
        return found

    def check(self) -> AuditCheck:
        """Check every line (well-formed, in sequence, chained) and the log's end (head)."""
        result = AuditCheck()
        # The head before the entries: read first, it cannot be ahead of them unless
        # entries were deleted (an append writes the entry, then moves the head).
        head_bytes = self._head_bytes()
        lines = self.stored_lines()
        problems = result.problems
        previous: StoredLine | None = None
        for line in lines:
            expected = previous.sequence + 1 if previous is not None else 1
            if line.sequence > expected + 1:
                problems.append(
                    f"entries {expected} to {line.sequence - 1} are missing "
                    f"(found {line.sequence} next)"
                )
            elif line.sequence == expected + 1:
                problems.append(f"entry {expected} is missing (found {line.sequence} next)")
            if line.entry is None:
                problems.append(self._unreadable(line))
            else:
                if line.entry.sequence != line.sequence:
                    problems.append(
                        f"line {line.line} ({self.store.uri(line.key)}): its sequence is "
                        f"{line.entry.sequence} but it is stored as entry {line.sequence}"
                    )
                digest = sha256_hex(previous.raw) if previous is not None else None
                if line.entry.previous_sha256 != digest:
                    problems.append(f"entry {line.sequence} does not chain to the entry before it")
            previous = line
        self._check_head(head_bytes, lines, result)
        return result

    def _check_head(
        self, head_bytes: bytes | None, lines: list[StoredLine], result: AuditCheck
    ) -> None:
        uri = self.store.uri(self.head_key)
        last = lines[-1].sequence if lines else 0
        if head_bytes is None:
            anchored = next(
                (ln for ln in lines if ln.entry is not None and ln.entry.anchored), None
            )
            if anchored is not None:
                result.problems.append(
                    f"no head recorded at {uri}, but entry {anchored.sequence} was written with "
                    "one: the head was deleted (or the append of the log's first entry is "
                    "still running or was interrupted; the next append writes it)"
                )
            elif lines:
                result.notes.append(
                    f"no head recorded at {uri}: this log predates heads, so entries deleted "
                    "from its end cannot be detected; the next append records one"
                )
            return
        head, error = _parse_head(head_bytes)
        if head is None:
            result.problems.append(f"the head {uri} is unreadable: {error}")
            return
        if last < head.sequence:
            ends = f"ends at entry {last}" if lines else "is empty"
            result.problems.append(
                f"the head records entry {head.sequence} but the log {ends}: entries were "
                "deleted from its end, or the log was rewritten"
            )
            return
        at_head = next((ln for ln in lines if ln.sequence == head.sequence), None)
        if at_head is None:
            result.problems.append(f"entry {head.sequence}, which the head records, is missing")
        elif sha256_hex(at_head.raw) != head.sha256:
            result.problems.append(
                f"entry {head.sequence} does not match the sha256 its head records: it was "
                "edited, or the log was rewritten"
            )
        if last > head.sequence:
            after = (
                f"entry {last}"
                if last == head.sequence + 1
                else f"entries {head.sequence + 1} to {last}"
            )
            result.notes.append(
                f"the head records entry {head.sequence}; {after} came after its last move (an "
                "append still running, or one interrupted before moving it; the next append "
                "moves it)"
            )

    def verify(self) -> list[str]:
        """Problems with the log's integrity: malformed lines, gaps in the sequence, a
        broken hash chain, or an end that does not match the head (see :meth:`check`)."""
        return self.check().problems

    def to_jsonl(self, model: str | None = None) -> str:
        return render_jsonl(self.entries(model))
