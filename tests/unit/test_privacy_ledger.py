"""The privacy-budget ledger (tasks/core/privacy/ledger.py, tasks/privacy_ledger.py):
idempotent appends, ε by composition (against dp_accounting called directly), tamper,
truncation and deletion detection, the refusal before a run, the stop mid-way, the tags a
model version gets, and ``fedround privacy ledger`` on a real command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld

from fedround.tasks.core import keys
from fedround.tasks.core.config import FederationConfig, parse_federation_config
from fedround.tasks.core.privacy import epsilon
from fedround.tasks.core.privacy.accounting import PLD_VALUE_DISCRETIZATION
from fedround.tasks.core.privacy.ledger import (
    BudgetExceeded,
    LedgerIntegrityError,
    spent_epsilon,
)
from fedround.tasks.object_store import LocalObjectStore
from fedround.tasks.privacy_ledger import (
    PrivacyLedger,
    check_before_run,
    planned_sampling_rate,
    privacy_tags,
    read_ledgers,
    record_round,
    round_fits,
    run_epsilon,
)

SITES = "sites: [{name: a}, {name: b}, {name: c}, {name: d}]\n"


def config(
    mode: str = "central",
    budget: float | None = None,
    rounds: int = 3,
    fraction: float = 0.5,
    federation: str = "fed",
) -> FederationConfig:
    budget_part = f", budget: {{epsilon: {budget}}}" if budget is not None else ""
    return parse_federation_config(
        f"federation: {federation}\ntenant: acme\ncontract: c.json\nrounds: {rounds}\n{SITES}"
        f"selection: {{fraction: {fraction}, min_sites: 1}}\n"
        f"privacy: {{mode: {mode}, noise_multiplier: 1.0, clip_norm: 1.0{budget_part}}}\n"
    )


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


# --- appends and composition ----------------------------------------------------------------


def test_recording_a_round_twice_counts_it_once(store: LocalObjectStore) -> None:
    cfg = config()
    first = record_round(store, cfg, "run-1", 1, ["a", "b"])
    again = record_round(store, cfg, "run-1", 1, ["a", "b"])  # a resumed run
    assert first == again
    ledgers = read_ledgers(store, "acme", ["a", "b", "c", "d"])
    assert [(e.run_id, e.round, e.sampling_rate) for e in ledgers.tenant] == [("run-1", 1, 0.5)]
    # central DP charges every site (amplification by subsampling assumes any may be in)
    assert all(len(entries) == 1 for entries in ledgers.sites.values())
    assert ledgers.tenant[0].sites == ("a", "b", "c", "d")


def test_local_dp_charges_only_the_selected_sites_at_q_1(store: LocalObjectStore) -> None:
    record_round(store, config(mode="local"), "run-1", 1, ["b"])
    ledgers = read_ledgers(store, "acme", ["a", "b"])
    assert [e.sampling_rate for e in ledgers.tenant] == [1.0]
    assert ledgers.sites["a"] == [] and len(ledgers.sites["b"]) == 1


def test_spent_epsilon_composes_the_entries_like_dp_accounting_does(
    store: LocalObjectStore,
) -> None:
    cfg = config(rounds=5)
    for round_ in range(1, 6):
        record_round(store, cfg, "run-1", round_, ["a", "b"])
    assert run_epsilon(store, cfg, "run-1") == pytest.approx(
        epsilon(1.0, 0.5, 5, 1e-5, "pld"), rel=1e-9
    )
    # Two runs at different q: composed, not summed
    mixed = [(1.0, 0.5)] * 5 + [(2.0, 0.25)] * 7
    direct = pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    direct.compose(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0)), 5
    ).compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(2.0)), 7)
    composed = spent_epsilon(mixed, 1e-5, "pld")
    assert composed == pytest.approx(direct.get_epsilon(1e-5), rel=1e-3)
    separately = epsilon(1.0, 0.5, 5, 1e-5) + epsilon(2.0, 0.25, 7, 1e-5)
    assert epsilon(1.0, 0.5, 5, 1e-5) < composed < separately
    assert spent_epsilon([], 1e-5, "rdp") == 0.0
    assert spent_epsilon(mixed, 1e-5, "rdp") >= composed  # RDP is the looser bound


# --- tamper evidence -----------------------------------------------------------------------


def _three_rounds(store: LocalObjectStore) -> PrivacyLedger:
    cfg = config()
    for round_ in (1, 2, 3):
        record_round(store, cfg, "run-1", round_, ["a", "b"])
    return PrivacyLedger(store, "acme")


def test_an_edited_entry_is_detected(store: LocalObjectStore) -> None:
    ledger = _three_rounds(store)
    key = keys.privacy_ledger_entry_key("acme", None, 1)
    raw = store.get(key)
    store.put(key, raw.replace(b'"sampling_rate":0.5', b'"sampling_rate":0.05'))
    with pytest.raises(LedgerIntegrityError, match="edited or replaced"):
        ledger.read()


def test_a_reformatted_entry_is_detected(store: LocalObjectStore) -> None:
    ledger = _three_rounds(store)
    key = keys.privacy_ledger_entry_key("acme", None, 2)
    store.put(key, json.dumps(json.loads(store.get(key)), indent=1).encode())
    with pytest.raises(LedgerIntegrityError, match="canonical"):
        ledger.read()


def test_a_removed_entry_is_detected(store: LocalObjectStore) -> None:
    ledger = _three_rounds(store)
    store.delete(keys.privacy_ledger_entry_key("acme", None, 1))
    with pytest.raises(LedgerIntegrityError, match="entry 1 is missing"):
        ledger.read()


def test_a_truncated_ledger_is_detected(store: LocalObjectStore) -> None:
    ledger = _three_rounds(store)
    store.delete(keys.privacy_ledger_entry_key("acme", None, 2))
    with pytest.raises(LedgerIntegrityError, match="truncated"):
        ledger.read()


def test_a_deleted_ledger_is_never_read_as_empty(store: LocalObjectStore) -> None:
    ledger = _three_rounds(store)
    for sequence in (0, 1, 2):
        store.delete(keys.privacy_ledger_entry_key("acme", None, sequence))
    with pytest.raises(LedgerIntegrityError, match="deleted"):
        ledger.read()
    with pytest.raises(LedgerIntegrityError):  # nor spent against
        check_before_run(store, config(budget=100), "run-2", [])


def test_a_deleted_head_is_detected(store: LocalObjectStore) -> None:
    ledger = _three_rounds(store)
    store.delete(keys.privacy_ledger_head_key("acme", None))
    with pytest.raises(LedgerIntegrityError, match="no head"):
        ledger.read()


def test_a_deleted_site_ledger_is_detected_by_the_tenants(store: LocalObjectStore) -> None:
    _three_rounds(store)
    for key in store.list(keys.privacy_ledger_prefix("acme", "c")):
        store.delete(key)
    with pytest.raises(LedgerIntegrityError, match="ledger of site c lacks 3 round"):
        read_ledgers(store, "acme", ["a", "b", "c", "d"])


def test_an_append_cut_before_its_head_moved_still_reads(store: LocalObjectStore) -> None:
    ledger = _three_rounds(store)
    head_key = keys.privacy_ledger_head_key("acme", None)
    head = json.loads(store.get(head_key))
    entry1 = store.get(keys.privacy_ledger_entry_key("acme", None, 1))
    import hashlib

    store.put(
        head_key,
        json.dumps(
            {"sequence": 1, "sha256": hashlib.sha256(entry1).hexdigest()},
            sort_keys=True,
            separators=(",", ":"),
        ).encode(),
    )
    assert head["sequence"] == 2 and len(ledger.read()) == 3
    record_round(store, config(), "run-1", 4, ["a", "b"])
    assert json.loads(store.get(head_key))["sequence"] == 3


def test_a_resumed_run_whose_committed_rounds_are_not_recorded_is_refused(
    store: LocalObjectStore,
) -> None:
    _three_rounds(store)
    check_before_run(store, config(budget=100), "run-1", [0, 1, 2, 3])
    with pytest.raises(LedgerIntegrityError, match=r"committed round\(s\) \[1, 2\]"):
        check_before_run(store, config(budget=100), "run-9", [0, 1, 2])


# --- budgets --------------------------------------------------------------------------------


def test_a_run_that_would_exceed_the_budget_is_refused_naming_budget_spent_and_planned(
    store: LocalObjectStore,
) -> None:
    cfg = config(budget=7.0, rounds=3)
    spent_before = epsilon(1.0, 0.5, 3, 1e-5)  # 5.84
    assert spent_before < 7.0
    check_before_run(store, cfg, "run-1", [])
    for round_ in (1, 2, 3):
        record_round(store, cfg, "run-1", round_, ["a", "b"])
    with pytest.raises(BudgetExceeded) as caught:
        check_before_run(store, cfg, "run-2", [])
    message = str(caught.value)
    planned = epsilon(1.0, 0.5, 6, 1e-5)
    assert "privacy budget of tenant acme would be exceeded" in message
    assert "budget ε=7 at δ=1e-05" in message
    assert f"spent so far ε={spent_before:.4g}" in message
    assert f"3 planned round(s) ε={planned:.4g}" in message
    # the same run resumed spends nothing new
    assert all(c.planned == c.spent for c in check_before_run(store, cfg, "run-1", [1, 2, 3]))


def test_every_site_of_the_federation_is_checked_beside_the_tenant(
    store: LocalObjectStore,
) -> None:
    checks = check_before_run(store, config(budget=100.0), "run-1", [])
    assert [c.scope for c in checks] == ["tenant acme", "site a", "site b", "site c", "site d"]
    assert all(c.spent == 0 and c.planned_rounds == 3 for c in checks)


def test_round_fits_stops_a_run_at_the_last_round_that_fits(store: LocalObjectStore) -> None:
    budget = epsilon(1.0, 0.5, 2, 1e-5) * 1.001  # room for two rounds at q = 0.5
    cfg = config(budget=budget, rounds=3)
    assert round_fits(store, cfg, "run-1", 1, ["a", "b"]) is None
    record_round(store, cfg, "run-1", 1, ["a", "b"])
    assert round_fits(store, cfg, "run-1", 2, ["a", "b"]) is None
    record_round(store, cfg, "run-1", 2, ["a", "b"])
    over = round_fits(store, cfg, "run-1", 3, ["a", "b"])
    assert over is not None and not over.fits and over.scope == "tenant acme"
    assert round_fits(store, cfg, "run-1", 2, ["a", "b"]) is None  # recorded: free to redo


def test_planned_sampling_rate() -> None:
    assert planned_sampling_rate(config(fraction=0.5)) == 0.5
    assert planned_sampling_rate(config(fraction=0.3)) == 0.5  # ⌈0.3·4⌉ = 2 of 4
    assert planned_sampling_rate(config(mode="local", fraction=0.5)) == 1.0


def test_privacy_tags_record_the_mechanism_and_the_spend(store: LocalObjectStore) -> None:
    cfg = config(budget=10.0)
    for round_ in (1, 2):
        record_round(store, cfg, "run-1", round_, ["a", "b"])
    tags = privacy_tags(store, cfg, "run-1")
    assert float(tags["fedround.privacy.epsilon"]) == pytest.approx(
        epsilon(1.0, 0.5, 2, 1e-5), rel=1e-5
    )
    assert tags["fedround.privacy.rounds"] == "2"
    assert tags["fedround.privacy.sampling_rate"] == "0.5"
    assert tags["fedround.privacy.accountant"] == "pld"
    assert tags["fedround.privacy.noise_multiplier"] == "1"
    assert tags["fedround.privacy.clip_norm"] == "1"
    assert tags["fedround.privacy.delta"] == "1e-05"
    assert tags["fedround.privacy.tenant_epsilon_spent"].endswith("of 10")
    assert (
        privacy_tags(store, parse_federation_config(f"federation: f\ncontract: c\n{SITES}"), "r")
        == {}
    )


def test_the_ledger_command_prints_and_verifies(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    cfg = config()
    for round_ in (1, 2):
        record_round(store, cfg, "run-1", round_, ["a", "b"])
    command = [str(Path(sys.executable).with_name("fedround")), "privacy", "ledger", "acme"]
    state = ["--state-dir", str(tmp_path)]
    text = subprocess.run(command + state, capture_output=True, text=True, check=True).stdout
    assert "privacy ledger of tenant acme: 2 entries (hash chain verified)" in text
    assert "fed run run-1 round 2" in text and "σ=1 q=0.5 C=1" in text
    out = subprocess.run(
        [*command, "--site", "c", "--json", *state], capture_output=True, text=True, check=True
    ).stdout
    record = json.loads(out)
    assert record["site"] == "c" and len(record["entries"]) == 2
    assert record["epsilon"] == pytest.approx(epsilon(1.0, 0.5, 2, 1e-5), rel=1e-6)
    store.delete(keys.privacy_ledger_entry_key("acme", None, 1))
    broken = subprocess.run(command + state, capture_output=True, text=True)
    assert broken.returncode == 1 and "truncated" in broken.stderr
    assert math.isfinite(record["epsilon"])
