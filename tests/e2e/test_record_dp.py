"""Record-level DP-SGD (``privacy.mode: record``) end to end through the real CLI.

Scenario: three demo sites of about 300 images each train two rounds with Opacus's DP-SGD
(σ = 1, each example's gradient clipped to C = 1, batches of 32 Poisson-sampled at
q = 1/⌈n/32⌉) under a tenant budget. Each trained site's ledger gets one entry per round
with its own q and its ⌈n/32⌉ steps; the tenant's ledger the largest q and the most steps
of the round; the model version carries ε (mode ``record``, steps per round), which equals
what the tenant's entries compose to with dp_accounting called directly. The same run
again would pass the budget: it is refused once the contracts have counted the examples,
before any site trains, and registers nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from fedround.tasks.core.privacy import epsilon

from .helpers import fedround, run_ok, write_demo_federation

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FEDERATION = "e2e-record"
TENANT = "rec-test"
CONFIG = f"""\
federation: {FEDERATION}
tenant: {TENANT}
seed: 9
rounds: 2
data: {{source: mnist, train_size: 900, test_size: 300, split_seed: 42,
       partition: {{kind: iid, min_examples_per_site: 50}}}}
selection: {{min_sites: 3, deadline_s: 300}}
training: {{batch_size: 32, learning_rate: 0.5}}
privacy: {{mode: record, noise_multiplier: 1.0, clip_norm: 1.0, delta: 1.0e-5,
          budget: {{epsilon: 4.2}}}}
contract: {REPO}/deployments/examples/contracts/mnist-site-data.json
sites: [{{name: site-a}}, {{name: site-b}}, {{name: site-c}}]
"""


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("record-dp-state")


@pytest.fixture(scope="module")
def config_path(state_dir: Path) -> Path:
    return write_demo_federation(state_dir, "record-dp.yaml", CONFIG)


@pytest.fixture(scope="module")
def first_run(state_dir: Path, config_path: Path) -> dict[str, Any]:
    return run_ok(config_path, state_dir)


def _ledger(state_dir: Path, *site: str) -> dict[str, Any]:
    args = ["privacy", "ledger", TENANT, *(("--site", site[0]) if site else ()), "--json"]
    done = fedround(*args, state_dir=state_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout))


def test_each_site_is_charged_its_dp_sgd_steps(first_run: dict[str, Any], state_dir: Path) -> None:
    tenant = _ledger(state_dir)
    assert [e["round"] for e in tenant["entries"]] == [1, 2]
    worst = {(e["sampling_rate"], e.get("steps", 1)) for e in tenant["entries"]}
    for site in ("site-a", "site-b", "site-c"):
        entries = _ledger(state_dir, site)["entries"]
        assert [e["round"] for e in entries] == [1, 2]
        for entry in entries:
            assert entry["mode"] == "record"
            batches = round(1 / entry["sampling_rate"])
            assert entry["steps"] == batches  # one local epoch: k steps at q = 1/k
            assert 8 <= batches <= 11  # about 300 images in batches of 32
            q, steps = next(iter(worst))
            assert entry["sampling_rate"] <= q and entry["steps"] <= steps
    q, steps = next(iter(worst))
    assert len(worst) == 1
    assert tenant["epsilon"] == pytest.approx(epsilon(1.0, q, 2 * steps, 1e-5), rel=1e-6)


def test_the_model_version_carries_the_record_level_epsilon(
    first_run: dict[str, Any], state_dir: Path
) -> None:
    uri = first_run["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = client.get_model_version(f"{FEDERATION}-global", first_run["model"]["version"]).tags
    assert tags["fedround.privacy.mode"] == "record"
    assert float(tags["fedround.privacy.epsilon"]) == pytest.approx(
        _ledger(state_dir)["epsilon"], rel=1e-5
    )
    assert tags["fedround.privacy.rounds"] == "2"
    assert 8 <= int(tags["fedround.privacy.steps_per_round"]) <= 11
    history = client.get_metric_history(first_run["mlflow"]["run_id"], "privacy_epsilon")
    assert [m.step for m in history] == [1, 2] and history[0].value < history[1].value
    assert first_run["history"][-1]["accuracy"] > 0.2  # DP-SGD learns: chance is 0.1


def test_a_run_past_the_budget_is_refused_before_any_site_trains(
    first_run: dict[str, Any], state_dir: Path, config_path: Path
) -> None:
    before = _ledger(state_dir)
    done = fedround("run", str(config_path), "--json", state_dir=state_dir)
    assert done.returncode != 0
    assert f"privacy budget of tenant {TENANT} would be exceeded" in done.stderr, done.stderr[
        -3000:
    ]
    assert "budget ε=4.2 at δ=1e-05" in done.stderr
    assert _ledger(state_dir)["entries"] == before["entries"]  # nothing spent
    uri = first_run["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{FEDERATION}-global'")
    assert [str(v.version) for v in versions] == [first_run["model"]["version"]]
