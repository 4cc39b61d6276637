"""Many sites in one round, end to end: what the coordinator records changes shape, not
content, once a round has more sites than a person reads one by one.

Scenario: 40 sites with their own files and site.yaml (``data.source: sites``), every site
in both rounds, served by the two local site hosts.
- The run finishes with all 40 sites accepted in each round.
- Prefect: the sites' rounds are waited for in one task run per round (``round 1 · 40
  sites``), not 40; the round's table artifact still lists every site with its figures.
- MLflow: each site has one metric row per round (``site.<site>.num_examples``); its
  other figures are in the round's ``sites/round-0001.json`` artifact.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from .helpers import cli_env, run_user_federation, sites_yaml, write_array_federation

pytestmark = pytest.mark.slow

FEDERATION = "e2e-many"
SITES = {f"site-{i:02d}": 20 for i in range(40)}
CONTRACT = {
    "name": "many-arrays",
    "expectations": [
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "label", "value_set": [0, 1]},
        }
    ],
}
CONFIG = textwrap.dedent(
    f"""\
    federation: {FEDERATION}
    tenant: test
    seed: 5
    rounds: 2
    data: {{kind: arrays, source: sites}}
    model: {{factory: logistic_regression, in_features: 8, out_features: 2}}
    training: {{local_epochs: 1, learning_rate: 0.5, batch_size: 20}}
    evaluation: {{holdout: holdout.npz}}
    selection: {{min_sites: 30, deadline_s: 300}}
    contract: contract.json
    sites: {sites_yaml(SITES)}
    """
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_array_federation(
        tmp_path_factory.mktemp("many"),
        FEDERATION,
        SITES,
        package="fr_e2e_many",
        modules={},
        contract=CONTRACT,
        configs={"federation.yaml": CONFIG},
    )


@pytest.fixture(scope="module")
def result(root: Path) -> dict[str, Any]:
    done = run_user_federation(root)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.result


def test_every_site_is_accepted_in_every_round(result: dict[str, Any]) -> None:
    assert [h["round"] for h in result["history"]] == [1, 2]
    assert [h["sites_accepted"] for h in result["history"]] == [40, 40]


def test_one_task_run_waits_for_the_round_and_its_table_lists_every_site(
    result: dict[str, Any], root: Path
) -> None:
    query = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=RUN_ID)))
        tasks = await client.read_task_runs(limit=200)
        artifacts = await client.read_artifacts(limit=50)
        print(json.dumps({
            "task_runs": sorted(t.name for t in tasks if t.flow_run_id == runs[0].id),
            "tables": [a.data for a in artifacts
                       if a.flow_run_id == runs[0].id and a.type == "table"]}))
asyncio.run(main())
""".replace("RUN_ID", repr(result["run_id"]))
    env = cli_env(root / "state")
    env["PREFECT_HOME"] = str(root / "state" / "prefect")
    done = subprocess.run(
        [sys.executable, "-c", query], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    recorded = json.loads(done.stdout.strip().splitlines()[-1])
    names = recorded["task_runs"]
    assert "round 1 · 40 sites" in names and "round 2 · 40 sites" in names
    assert not [name for name in names if name.startswith("round 1 · site-")]
    assert len(recorded["tables"]) == 2
    for data in recorded["tables"]:
        rows = json.loads(data) if isinstance(data, str) else data
        assert sorted(row["site"] for row in rows) == sorted(SITES)
        assert all(row["status"] == "trained" and row["examples"] == 20 for row in rows)


def test_mlflow_has_one_row_per_site_and_the_figures_in_the_round_artifact(
    result: dict[str, Any],
) -> None:
    uri = result["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result["mlflow"]["run_id"])
    per_site = {key for key in run.data.metrics if key.startswith("site.site-00.")}
    assert "site.site-00.num_examples" in per_site
    assert "site.site-00.seconds" not in per_site and "site.site-00.bytes_up" not in per_site
    history = client.get_metric_history(run.info.run_id, "site.site-00.num_examples")
    assert [(m.step, m.value) for m in history] == [(1, 20.0), (2, 20.0)]
    local = client.download_artifacts(run.info.run_id, "sites/round-0001.json")
    figures = json.loads(Path(local).read_text())
    assert sorted(figures) == sorted(SITES)
    assert all(f["num_examples"] == 20 and f["seconds"] > 0 for f in figures.values())
    assert all(f["bytes_up"] > 0 for f in figures.values())
