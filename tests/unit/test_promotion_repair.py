"""Intent → alias → outcome, and the repair of a change that died in between; breaking a
lock from the command line. An in-memory registry stands in for MLflow here; the same
flows against the real MLflow server are in tests/integration/test_promotion.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedround.flows.cli.main import app
from fedround.tasks.audit import AuditLog, pending_intents
from fedround.tasks.core import keys
from fedround.tasks.lifecycle import Lifecycle
from fedround.tasks.locks import Lock, LockLost, read_lock
from fedround.tasks.object_store import LocalObjectStore
from fedround.tasks.registry import CANDIDATE, DEPRECATED, PRODUCTION

pytestmark = pytest.mark.security("promotion-crash")


@dataclass
class Version:
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class MemoryRegistry:
    """The slice of ModelRegistry that Lifecycle uses."""

    name: str = "m"
    versions: dict[str, Version] = field(default_factory=dict)
    alias_map: dict[str, str] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    fail_on_set_alias: bool = False

    def aliases(self) -> dict[str, str]:
        return dict(self.alias_map)

    def set_alias(self, alias: str, version: str) -> None:
        if self.fail_on_set_alias:
            raise ConnectionError("registry unreachable")
        self.alias_map[alias] = version

    def delete_alias(self, alias: str) -> None:
        self.alias_map.pop(alias, None)

    def get(self, version: str) -> Version:
        return self.versions.setdefault(version, Version())

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        self.get(version).tags.update(tags)

    def production_history(self) -> list[str]:
        return list(self.history)

    def set_production_history(self, versions: list[str]) -> None:
        self.history = list(versions)

    def verify(self, version: str) -> None:
        pass


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def _lifecycle(store: LocalObjectStore, registry: MemoryRegistry) -> Lifecycle:
    lock = Lock(store, keys.lock_key("f", "promotion-m"), ttl_s=60, holder="ops@a").acquire()
    return Lifecycle(registry, AuditLog(store, "f"), lock)  # type: ignore[arg-type]


def _in_production(version: str = "1") -> MemoryRegistry:
    registry = MemoryRegistry(alias_map={PRODUCTION: version, CANDIDATE: "2"}, history=[version])
    return registry


class Crash(BaseException):
    """The process dies here (nothing after it runs)."""


def test_an_alias_change_is_audited_as_intent_then_outcome(store: LocalObjectStore) -> None:
    registry = _in_production()
    lifecycle = _lifecycle(store, registry)

    entry = lifecycle.make_production("2", "1", "gates passed", {"gain": 0.1}, "evaluate")

    intent, outcome = AuditLog(store, "f").entries()
    assert (intent.action, intent.version, intent.details["aliases"]) == (
        "intent",
        "2",
        {PRODUCTION: "2"},
    )
    assert outcome == entry and outcome.action == "promote"
    assert outcome.details == {"stage": "evaluate", "figures": {"gain": 0.1}, "intent": 1}
    assert registry.alias_map == {PRODUCTION: "2", DEPRECATED: "1"}
    assert registry.history == ["1", "2"]
    assert lifecycle.pending() == [] and lifecycle.reconcile() == []


def test_a_promotion_that_died_after_moving_the_alias_is_finished_by_the_repair(
    store: LocalObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Trigger: the promotion dies right after the alias write, before anything else
    registry = _in_production()
    crashed = _lifecycle(store, registry)

    def die(*args: Any, **kwargs: Any) -> None:
        raise Crash

    monkeypatch.setattr(crashed, "_finish", die)
    with pytest.raises(Crash):
        crashed.make_production("2", "1", "gates passed", {}, "evaluate")
    monkeypatch.undo()
    crashed.lock.release()  # (its lease would run out)

    # Fault: production moved with no outcome in the audit log
    assert registry.alias_map[PRODUCTION] == "2"
    (intent,) = pending_intents(AuditLog(store, "f").entries())

    # Expected: the next holder finishes it, marked as a repair, once
    repaired = _lifecycle(store, registry).reconcile()
    assert [e.action for e in repaired] == ["promote"]
    assert repaired[0].details["intent"] == intent.sequence and repaired[0].details["repaired"]
    assert "completed by a repair" in repaired[0].reason
    assert registry.alias_map == {PRODUCTION: "2", DEPRECATED: "1"}
    assert registry.history == ["1", "2"]
    assert registry.get("2").tags["fedround.status"] == PRODUCTION
    assert _lifecycle_again(store, registry).reconcile() == []
    assert AuditLog(store, "f").verify() == []


def _lifecycle_again(store: LocalObjectStore, registry: MemoryRegistry) -> Lifecycle:
    Lock(store, keys.lock_key("f", "promotion-m"), ttl_s=60, holder="x").release()
    store.delete(keys.lock_key("f", "promotion-m"))
    return _lifecycle(store, registry)


def test_a_promotion_that_died_before_the_alias_moved_is_recorded_as_abandoned(
    store: LocalObjectStore,
) -> None:
    registry = _in_production()
    registry.fail_on_set_alias = True
    crashed = _lifecycle(store, registry)
    with pytest.raises(ConnectionError):
        crashed.make_production("2", "1", "gates passed", {}, "evaluate")
    registry.fail_on_set_alias = False

    written = _lifecycle_again(store, registry).reconcile()

    assert [e.action for e in written] == ["abandon"]
    assert written[0].details == {"intent": 1, "aliases_found": {PRODUCTION: "1"}}
    assert "nothing changed" in written[0].reason
    assert registry.alias_map[PRODUCTION] == "1" and registry.history == ["1"]


def test_a_rollback_after_a_crashed_promotion_repairs_it_then_rolls_back(
    store: LocalObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = _in_production()
    crashed = _lifecycle(store, registry)
    monkeypatch.setattr(crashed, "_finish", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        crashed.make_production("2", "1", "gates passed", {}, "evaluate")
    monkeypatch.undo()

    rollback = _lifecycle_again(store, registry)
    rollback.reconcile()
    entry = rollback.roll_back("v2 misbehaves")

    assert entry.action == "rollback" and entry.version == "1"
    assert registry.alias_map[PRODUCTION] == "1" and registry.history == ["1"]
    actions = [e.action for e in AuditLog(store, "f").entries()]
    assert actions == ["intent", "promote", "intent", "rollback"]
    assert pending_intents(AuditLog(store, "f").entries()) == []


def test_a_canary_and_its_rollback_are_intents_with_outcomes(store: LocalObjectStore) -> None:
    registry = _in_production()
    lifecycle = _lifecycle(store, registry)
    lifecycle.start_canary("2", ["site-a", "site-b"], {}, "1")
    assert registry.alias_map["production-site-a"] == "2"
    lifecycle.roll_back("canary looks bad")
    assert "production-site-a" not in registry.alias_map
    assert registry.get("2").tags["fedround.status"] == "rolled_back"
    entries = AuditLog(store, "f").entries()
    assert [e.action for e in entries] == ["intent", "canary", "intent", "rollback"]
    assert entries[3].details["aliases_removed"] == ["production-site-a", "production-site-b"]
    assert pending_intents(entries) == []


def test_a_holder_that_lost_its_lock_writes_no_intent(store: LocalObjectStore) -> None:
    registry = _in_production()
    lifecycle = _lifecycle(store, registry)
    store.delete(keys.lock_key("f", "promotion-m"))
    with pytest.raises(LockLost):
        lifecycle.make_production("2", "1", "gates passed", {}, "evaluate")
    assert AuditLog(store, "f").entries() == [] and registry.alias_map[PRODUCTION] == "1"


# --- the command line ---------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    saved = dict(os.environ)
    monkeypatch.delenv("FEDROUND_OBJECT_STORE", raising=False)
    monkeypatch.setenv("FEDROUND_ACTOR", "oncall@ops")
    yield tmp_path / "state"
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.security("stale-lock")
def test_cli_breaks_a_lock_only_with_a_reason_and_audits_it(state: Path) -> None:
    store = LocalObjectStore(state / "objects")
    key = keys.lock_key("f", "promotion-m")
    Lock(store, key, ttl_s=3600, holder="alice@a", purpose="promote m v2").acquire()
    runner = CliRunner()

    shown = runner.invoke(app, ["lock", "show", "f", "--state-dir", str(state)])
    assert shown.exit_code == 0, shown.output
    assert "promotion-m  held  alice@a on " in shown.stdout and "promote m v2" in shown.stdout

    refused = runner.invoke(app, ["lock", "break", "f", "promotion-m", "--state-dir", str(state)])
    assert refused.exit_code == 1 and "needs a reason" in refused.stderr
    assert "Traceback" not in refused.output
    assert not (read_lock(store, key) or {}).get("broken")

    why = ["--reason", "pod evicted mid-promotion"]
    done = runner.invoke(
        app, ["lock", "break", "f", "promotion-m", *why, "--state-dir", str(state)]
    )
    assert done.exit_code == 0, done.output
    assert "of alice@a (promote m v2); audit entry #1" in done.stderr
    (entry,) = AuditLog(store, "f").entries()
    assert (entry.action, entry.model, entry.actor) == ("lock-break", "m", "oncall@ops")
    assert entry.reason == "pod evicted mid-promotion"
    assert entry.details["broken_lock"]["holder"] == "alice@a"
    assert Lock(store, key, ttl_s=60, holder="bob@b").try_acquire()


def test_cli_audit_verify_notes_a_half_done_change(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalObjectStore(state / "objects")
    AuditLog(store, "f").append(
        "intent", "m", version="2", details={"intends": "promote", "aliases": {}}
    )
    verified = CliRunner().invoke(app, ["audit", "f", "--verify", "--state-dir", str(state)])
    assert verified.exit_code == 0, verified.output  # a note, not a broken log
    assert "entry 1 records the intent to promote m v2 but no outcome" in verified.stderr
    assert "--repair" in verified.stderr
    assert json.loads(verified.stdout)["action"] == "intent"
