"""The embedded default end to end: the real CLI, a temporary Prefect server, MLflow on
sqlite, GE at every site, the local object store; then the state each of them recorded.

Scenario (NVFlare-style): trigger → fault → expected state.
- site-d's labels are corrupted before the run: it is excluded by its data contract with a
  message naming the column and the rule; the three others train.
- the run's final checkpoint verifies, the model is registered as ``candidate`` and Prefect
  recorded the flow run and a task run per site and round.
- a second run is SIGKILLed (coordinator, site processes and Prefect server together) after
  its first committed round and resumed: its final weights are byte-identical to the first.
- tampering with a checkpoint makes a resume fail with a clear error.
- the local site host serving site-b is SIGKILLed after round 1: it is started again, and
  site-b's second session rejoins the run, which finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from fedround.site_workers.data import read_arrays, save_site_data
from fedround.tasks.checkpoints import load_checkpoint
from fedround.tasks.core import keys
from fedround.tasks.core.serialization import sha256_hex
from fedround.tasks.object_store import LocalObjectStore

from .helpers import cli_env, fedround, provision_demo_federation, start_fedround

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).with_name("four-sites.yaml")
FEDERATION = "e2e-mnist"


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def first_run(state_dir: Path) -> dict[str, Any]:
    """Provision the sites, break site-d's labels, run the federation through the CLI."""
    provision_demo_federation(CONFIG, state_dir)
    shard = state_dir / "federations" / FEDERATION / "sites" / "site-d" / "train.npz"
    arrays = read_arrays(shard)
    labels = arrays["labels"].copy()
    labels[:5] = 12  # a label outside 0-9
    save_site_data(shard, arrays["features"], labels)

    done = fedround("run", str(CONFIG), "--json", state_dir=state_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.result


def test_federation_trains_and_excludes_the_broken_site(first_run: dict[str, Any]) -> None:
    assert first_run["rounds"] == 3
    assert first_run["final_metrics"]["accuracy"] > 0.5  # chance is 0.1
    assert first_run["sites"]["participating"] == ["site-a", "site-b", "site-c"]
    reason = first_run["sites"]["excluded"]["site-d"]
    assert "column 'label' broke expect_column_values_to_be_in_set" in reason
    assert reason.endswith("): 5 rows") and "12" not in reason  # the count, never the values
    accuracies = [h["accuracy"] for h in first_run["history"]]
    assert len(accuracies) == 3 and accuracies[-1] > accuracies[0]


def test_final_checkpoint_verifies(first_run: dict[str, Any], state_dir: Path) -> None:
    store = LocalObjectStore(state_dir / "objects")
    final = load_checkpoint(store, FEDERATION, first_run["run_id"], 3)  # verifies digests
    prefix = keys.checkpoint_prefix(FEDERATION, first_run["run_id"], 3)
    weights_key = prefix + "weights.safetensors"
    assert sha256_hex(store.get(weights_key)) == first_run["checkpoint"]["weights_sha256"]
    assert final.manifest.sites == ["site-a", "site-b", "site-c"]


def test_model_is_registered_as_candidate(first_run: dict[str, Any]) -> None:
    uri = first_run["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("e2e-mnist-global", "candidate")
    assert str(version.version) == first_run["model"]["version"] == "1"
    assert version.tags["fedround.weights_sha256"] == first_run["checkpoint"]["weights_sha256"]
    assert version.tags["fedround.run_id"] == first_run["run_id"]
    run = client.get_run(first_run["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert "site-d" in json.loads(run.data.tags["fedround.excluded_sites"])
    steps = client.get_metric_history(run.info.run_id, "accuracy")
    assert [m.step for m in steps] == [1, 2, 3]


def test_prefect_recorded_the_flow_and_task_runs(
    first_run: dict[str, Any], state_dir: Path
) -> None:
    query = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.client.schemas.sorting import ArtifactSort
async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=RUN_ID)))
        artifacts = await client.read_artifacts(sort=ArtifactSort.CREATED_DESC, limit=50)
        arts = [[a.type, a.key, a.description, a.data]
                for a in artifacts if a.flow_run_id == runs[0].id]
        tasks = await client.read_task_runs(limit=200)
        mine = sorted(t.name for t in tasks if t.flow_run_id == runs[0].id)
        print(json.dumps({"flow_runs": [[r.name, r.state_type.value] for r in runs],
                          "tags": sorted(runs[0].tags),
                          "task_runs": mine, "artifacts": arts}))
asyncio.run(main())
""".replace("RUN_ID", repr(first_run["run_id"]))
    env = cli_env(state_dir)
    env["PREFECT_HOME"] = str(state_dir / "prefect")
    done = subprocess.run(
        [sys.executable, "-c", query], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    recorded = json.loads(done.stdout.strip().splitlines()[-1])
    [(name, state)] = recorded["flow_runs"]
    assert state == "COMPLETED"
    assert name.startswith("e2e-mnist · 20") and name.endswith(f"embedded · {first_run['run_id']}")
    assert {"tenant:test", "federation:e2e-mnist"} <= set(recorded["tags"])
    # One table per round (site, status, reason, figures) and the run's summary with a chart.
    tables = [a for a in recorded["artifacts"] if a[0] == "table"]
    assert sorted(a[2].split(" · round ")[1].split(":")[0] for a in tables) == ["1", "2", "3"]
    rows = json.loads(tables[0][3]) if isinstance(tables[0][3], str) else tables[0][3]
    by_site = {row["site"]: row for row in rows}
    assert {by_site[s]["status"] for s in ("site-a", "site-b", "site-c")} == {"trained"}
    assert by_site["site-d"]["status"] == "excluded" and "label" in by_site["site-d"]["reason"]
    for site in ("site-a", "site-b", "site-c"):
        assert by_site[site]["examples"] > 0 and by_site[site]["bytes up"] > 0
    summaries = [a for a in recorded["artifacts"] if a[0] == "markdown"]
    assert [a[1] for a in summaries] == ["e2e-mnist-run-summary"]
    summary = summaries[0][3]
    assert "| sites | 3 took part, 1 excluded |" in summary
    assert "![accuracy per round](data:image/png;base64," in summary
    names = set(recorded["task_runs"])
    for round_ in (1, 2, 3):
        for site in ("site-a", "site-b", "site-c"):
            assert f"round {round_} · {site}" in names
        assert f"round {round_} · aggregate" in names
    assert "site-d · data contract" in names
    assert "round 1 · site-d" not in names


def test_killed_run_resumes_to_identical_weights(
    first_run: dict[str, Any], state_dir: Path
) -> None:
    run_id = "crash-and-resume"
    manifest = (
        state_dir / "objects" / keys.checkpoint_prefix(FEDERATION, run_id, 1) / "manifest.json"
    )
    process = start_fedround("run", str(CONFIG), "--run-id", run_id, state_dir=state_dir)
    deadline = time.monotonic() + 300
    while not manifest.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "round 1 was never committed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the coordinator, its site processes and Prefect
    process.communicate()
    store = LocalObjectStore(state_dir / "objects")
    assert not store.exists(keys.checkpoint_prefix(FEDERATION, run_id, 3) + "manifest.json")

    resumed = fedround("run", str(CONFIG), "--run-id", run_id, "--json", state_dir=state_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.result["resumed_from_round"] >= 1
    assert (
        resumed.result["checkpoint"]["weights_sha256"] == first_run["checkpoint"]["weights_sha256"]
    )


@pytest.mark.security("untrusted-site-objects")
def test_tampered_checkpoint_is_refused_on_resume(
    first_run: dict[str, Any], state_dir: Path
) -> None:
    store = LocalObjectStore(state_dir / "objects")
    key = keys.checkpoint_prefix(FEDERATION, first_run["run_id"], 3) + "weights.safetensors"
    original = store.get(key)
    tampered = bytearray(original)
    tampered[-8:] = np.float32(1e9).tobytes() * 2
    store.put(key, bytes(tampered))
    try:
        done = fedround("run", str(CONFIG), "--run-id", first_run["run_id"], state_dir=state_dir)
    finally:
        store.put(key, original)
    assert done.returncode == 1
    assert "checkpoint round 3 of run" in done.stderr and "is corrupted" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.security("two-coordinators")
def test_a_second_coordinator_on_a_live_run_id_is_refused(
    first_run: dict[str, Any], state_dir: Path
) -> None:
    from fedround.tasks.run_lock import RunLease

    # Trigger: a coordinator is live on the run id (this process holds its run lease, as
    # the coordinator's own process does while it runs; a real run here ends too fast to
    # be caught reliably) ...
    run_id = "one-coordinator"
    store = LocalObjectStore(state_dir / "objects")
    live = RunLease(store, FEDERATION, run_id, holder="ops@coordinator-1").acquire()
    try:
        # Fault: ... and a second coordinator starts the same run id
        second = fedround("run", str(CONFIG), "--run-id", run_id, state_dir=state_dir)
    finally:
        live.release()

    # Expected: refused in one line naming the holder, its host and its lease, before it
    # wrote anything of the run
    assert second.returncode == 1, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, second.stderr[-3000:]
    assert f"run {run_id} of federation {FEDERATION} is already running" in errors[0]
    assert "ops@coordinator-1 on host " in errors[0] and f"(pid {os.getpid()})" in errors[0]
    assert "lease until " in errors[0] and "fedround lock break" in errors[0]
    assert "Traceback" not in second.stderr
    assert not store.list(keys.checkpoints_prefix(FEDERATION, run_id))
    assert not store.exists(keys.contract_key(FEDERATION, run_id))


def test_a_killed_site_host_is_started_again_and_its_site_rejoins(
    first_run: dict[str, Any], state_dir: Path, tmp_path: Path
) -> None:
    """Embedded sites run the distributed round protocol in local site hosts: a host that
    dies is noticed by its sites' heartbeats, started again, and its site gets a new
    session that rejoins the run, as a restarted site worker's does."""
    from fedround.tasks.checkpoints import read_manifest

    contracts = Path(__file__).resolve().parents[2] / "deployments"
    config = tmp_path / "six-rounds.yaml"
    config.write_text(
        CONFIG.read_text()
        .replace("rounds: 3", "rounds: 6")
        .replace("deadline_s: 300}", "deadline_s: 300, liveness_s: 3}")
        .replace("../../deployments", str(contracts))
    )
    run_id = "host-killed"
    store = LocalObjectStore(state_dir / "objects")
    first = keys.checkpoint_prefix(FEDERATION, run_id, 1) + "manifest.json"
    # Trigger: a run of six rounds; once its first round is committed ...
    process = start_fedround("run", str(config), "--run-id", run_id, "--json", state_dir=state_dir)
    deadline = time.monotonic() + 300
    while not store.exists(first):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "round 1 was never committed"
        time.sleep(0.05)
    # Fault: ... the site host serving site-b (its heartbeat names the process) is killed
    beat = json.loads(store.get(keys.session_key(FEDERATION, run_id, "site-b", 1)))
    assert beat["host"].startswith("local-") and beat["pid"] != process.pid
    other = json.loads(store.get(keys.session_key(FEDERATION, run_id, "site-a", 1)))
    assert other["pid"] != beat["pid"]  # site-a and site-c are served by the other host
    os.kill(beat["pid"], signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=600)

    # Expected: the run finishes; site-b got a second session from a new host, which
    # rejoined: site-b is in the last round; site-a and site-c (the other host) in every one
    assert process.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["run_id"] == run_id
    second = json.loads(store.get(keys.session_key(FEDERATION, run_id, "site-b", 2)))
    assert second["pid"] != beat["pid"]
    sites = {r: read_manifest(store, FEDERATION, run_id, r).sites for r in range(1, 7)}
    assert "site-b" in sites[1] and "site-b" in sites[6]
    assert all({"site-a", "site-c"} <= set(sites[r]) for r in sites)
