"""Federated evaluation and the label-skew report, end to end through the real CLI.

Trigger → expected state. The demo's sites hold held-out shards that together make up
exactly the coordinator's held-out set, so with every site evaluating, the federated
accuracy of each round's model (reported by the next round's sites, and for the last
round by the final pass) must equal the central accuracy on that set, and the federated
loss the central loss. The label-skew report covers every site, from counts only, and the
per-site figures reach MLflow at the model's round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from fedround.site_workers.data import read_arrays

from .helpers import fedround

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SITES = ["site-a", "site-b", "site-c"]
CONFIG = f"""
federation: e2e-fedeval
seed: 11
rounds: 2
data: {{source: mnist, train_size: 900, test_size: 300, split_seed: 3,
       partition: {{kind: dirichlet, alpha: 0.3, min_examples_per_site: 60}}}}
training: {{local_epochs: 1, batch_size: 32, learning_rate: 0.05}}
selection: {{min_sites: 2, deadline_s: 300}}
evaluation: {{federated: {{every: 1, fraction: 1.0}}}}
contract: {REPO}/deployments/examples/contracts/mnist-site-data.json
sites: [{{name: site-a}}, {{name: site-b}}, {{name: site-c}}]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("fedeval")
    config = root / "federation.yaml"
    config.write_text(CONFIG)
    state = root / "state"
    done = fedround("run", str(config), "--json", state_dir=state)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.result, state


def test_federated_figures_equal_central_ones_on_the_same_examples(
    run: tuple[dict[str, Any], Path],
) -> None:
    result, _ = run
    history = {h["round"]: h for h in result["history"]}
    assert sorted(history) == [1, 2]
    for round_ in (1, 2):  # round 1's from round 2's sites; round 2's from the final pass
        entry = history[round_]
        assert entry["federated_sites"] == 3
        assert entry["federated_examples"] == 300
        assert entry["federated_accuracy"] == pytest.approx(entry["accuracy"], abs=1e-9)
        assert entry["federated_loss"] == pytest.approx(entry["loss"], rel=1e-5)
    assert history[2]["accuracy"] != history[1]["accuracy"]  # the model changed
    final = result["final_metrics"]
    assert final["federated_accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)
    per_site = result["sites"]["final_evaluation"]["sites"]
    assert sorted(per_site) == SITES
    assert sum(s["examples"] for s in per_site.values()) == 300
    pooled = sum(s["accuracy"] * s["examples"] for s in per_site.values()) / 300
    assert pooled == pytest.approx(final["accuracy"], abs=1e-9)


def test_label_skew_is_reported_from_the_sites_counts(run: tuple[dict[str, Any], Path]) -> None:
    result, state = run
    skew = result["sites"]["label_skew"]
    assert sorted(skew["sites"]) == SITES
    assert sum(skew["federation"].values()) == 900
    for site in SITES:
        labels = read_arrays(state / "federations/e2e-fedeval/sites" / site / "train.npz")["labels"]
        counts = np.bincount(labels, minlength=10).astype(float)
        total = np.array([skew["federation"].get(str(k), 0.0) for k in range(10)])
        expected = counts.sum() * total / total.sum()
        mask = expected > 0
        chi2 = float((((counts - expected) ** 2)[mask] / expected[mask]).sum())
        assert skew["sites"][site]["examples"] == counts.sum()
        assert skew["sites"][site]["chi2"] == pytest.approx(chi2)
    assert skew["max_tv_distance"] == max(s["tv_distance"] for s in skew["sites"].values())


def test_mlflow_has_the_figures_at_the_models_round(run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    uri = result["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    run_id = result["mlflow"]["run_id"]
    steps = client.get_metric_history(run_id, "federated_accuracy")
    assert sorted(m.step for m in steps) == [0, 1, 2]  # the initial model's too
    for site in SITES:
        assert sorted(
            m.step for m in client.get_metric_history(run_id, f"site.{site}.eval_accuracy")
        ) == [0, 1, 2]
        assert client.get_metric_history(run_id, f"site.{site}.label_chi2")
    run_data = client.get_run(run_id).data
    assert run_data.tags["fedround.label_skew_most_skewed_site"] in SITES
    artifacts = {a.path for a in client.list_artifacts(run_id, "lineage")}
    assert "lineage/label_skew.json" in artifacts
