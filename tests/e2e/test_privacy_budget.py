"""Central DP-FedAvg with a tenant budget, end to end through the real CLI.

Scenario (NVFlare-style): trigger → fault → expected state.
- A federation of three demo sites trains two rounds with ``privacy.mode: central``
  (σ = 1, C = 0.005, every site every round: q = 1; with three sites the noise on the mean,
  σC/3 per coordinate, would swamp a larger C: DP-FedAvg wants many sites) under a
  tenant budget of ε = 8 at δ = 1e-5: the run spends ε ≈ 6.57 (PLD), which MLflow
  shows per round (``privacy_epsilon``), the registered model version carries (ε, δ, σ,
  C, accountant, rounds, q) as tags, and ``fedround lineage`` prints.
- C is adaptive (Andrew et al.): round 1 clips at 0.005, round 2 at the C that round 1's
  noised count of unclipped updates moved it to (``dp_clip_norm`` in MLflow); the
  accountant's ε is the same as with a fixed C.
- The same federation run again would spend ε ≈ 10.0 in all: it is refused before it
  starts, naming the budget, the spend so far and the planned spend; no model is registered.
- ``fedround privacy ledger`` prints the tenant's and a site's ledger: two rounds each.
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
FEDERATION = "e2e-dp"
CONFIG = f"""\
federation: {FEDERATION}
tenant: dp-test
seed: 5
rounds: 2
data: {{source: mnist, train_size: 900, test_size: 300, split_seed: 42,
       partition: {{kind: iid, min_examples_per_site: 50}}}}
selection: {{min_sites: 3, deadline_s: 300}}
privacy: {{mode: central, noise_multiplier: 1.0, clip_norm: 0.005, delta: 1.0e-5,
          budget: {{epsilon: 8.0}}, adaptive_clipping: {{target_quantile: 0.5}}}}
contract: {REPO}/deployments/examples/contracts/mnist-site-data.json
sites: [{{name: site-a}}, {{name: site-b}}, {{name: site-c}}]
"""
SPENT = epsilon(1.0, 1.0, 2, 1e-5)  # ≈ 6.57
PLANNED = epsilon(1.0, 1.0, 4, 1e-5)  # ≈ 10.0 > 8


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dp-state")


@pytest.fixture(scope="module")
def config_path(state_dir: Path) -> Path:
    return write_demo_federation(state_dir, "dp.yaml", CONFIG)


@pytest.fixture(scope="module")
def first_run(state_dir: Path, config_path: Path) -> dict[str, Any]:
    return run_ok(config_path, state_dir)


def test_epsilon_is_logged_per_round_and_on_the_model_version(first_run: dict[str, Any]) -> None:
    uri = first_run["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    steps = client.get_metric_history(first_run["mlflow"]["run_id"], "privacy_epsilon")
    assert [m.step for m in steps] == [1, 2]
    assert steps[0].value == pytest.approx(epsilon(1.0, 1.0, 1, 1e-5), rel=1e-6)
    assert steps[1].value == pytest.approx(SPENT, rel=1e-6)
    version = client.get_model_version(f"{FEDERATION}-global", first_run["model"]["version"])
    tags = version.tags
    assert float(tags["fedround.privacy.epsilon"]) == pytest.approx(SPENT, rel=1e-5)
    assert tags["fedround.privacy.delta"] == "1e-05"
    assert tags["fedround.privacy.noise_multiplier"] == "1"
    assert tags["fedround.privacy.clip_norm"] == "adaptive from 0.005 (quantile 0.5, rate 0.2)"
    assert tags["fedround.privacy.accountant"] == "pld"
    assert tags["fedround.privacy.rounds"] == "2"
    assert tags["fedround.privacy.sampling_rate"] == "1"
    assert tags["fedround.privacy.mode"] == "central"


def test_adaptive_clipping_moves_c_between_rounds(first_run: dict[str, Any]) -> None:
    uri = first_run["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    history = client.get_metric_history(first_run["mlflow"]["run_id"], "dp_clip_norm")
    clip = {m.step: m.value for m in history}
    assert sorted(clip) == [1, 2]
    assert clip[1] == pytest.approx(0.005)
    # exp(±0.2·(b̄ − 0.5)) for a noised fraction b̄: moved, by a bounded factor
    assert clip[2] != pytest.approx(0.005) and 0.005 / 3 < clip[2] < 0.005 * 3
    fractions = client.get_metric_history(first_run["mlflow"]["run_id"], "dp_unclipped_fraction")
    assert [m.step for m in fractions] == [1, 2]


def test_lineage_prints_the_privacy_budget(first_run: dict[str, Any], state_dir: Path) -> None:
    done = fedround(
        "lineage", f"{FEDERATION}-global", first_run["model"]["version"], state_dir=state_dir
    )
    assert done.returncode == 0, done.stderr[-2000:]
    section = done.stdout.split("Privacy budget", 1)[1].split("Checkpoints", 1)[0]
    assert "not recorded" not in section
    assert "privacy.epsilon: " in section and "privacy.accountant: pld" in section
    assert "privacy.rounds: 2" in section


def test_a_run_past_the_budget_is_refused_before_it_starts(
    first_run: dict[str, Any], state_dir: Path, config_path: Path
) -> None:
    done = fedround("run", str(config_path), "--json", state_dir=state_dir)
    assert done.returncode != 0
    err = done.stderr
    assert "privacy budget of tenant dp-test would be exceeded" in err, err[-3000:]
    assert "budget ε=8 at δ=1e-05" in err
    assert f"spent so far ε={SPENT:.4g}" in err
    assert f"2 planned round(s) ε={PLANNED:.4g}" in err
    uri = first_run["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{FEDERATION}-global'")
    assert [str(v.version) for v in versions] == [first_run["model"]["version"]]


def test_the_ledger_command_shows_both_rounds(first_run: dict[str, Any], state_dir: Path) -> None:
    done = fedround("privacy", "ledger", "dp-test", state_dir=state_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "privacy ledger of tenant dp-test: 2 entries (hash chain verified)" in done.stdout
    assert f"run {first_run['run_id']} round 2" in done.stdout
    site = fedround(
        "privacy", "ledger", "dp-test", "--site", "site-b", "--json", state_dir=state_dir
    )
    record = json.loads(site.stdout)
    assert [e["round"] for e in record["entries"]] == [1, 2]
    assert record["epsilon"] == pytest.approx(SPENT, rel=1e-6)
