"""The distributed runtime end to end, on real servers and real worker processes.

A Prefect server on Postgres, the S3 server with one identity per site, an MLflow server
(all from ``tests/services.py``), one ``fedround site start`` worker process per site
pool, and the coordinator as ``fedround run --distributed`` (or as a deployment run picked
up by ``fedround coordinator start``). Scenarios (trigger → fault → expected state):

- a 3-round federation completes and its final weights are byte-identical to the
  embedded mode's for the same config and seeds;
- a site worker killed mid-round: the round completes with the others, the site rejoins
  a later round once its worker restarts;
- a site slower than the deadline (it holds far more data than the others): left out of
  the rounds it cannot finish in time, its late updates rejected when they arrive;
- the coordinator SIGKILLed mid-run and re-run: resumes to identical final weights;
- quorum lost: the run fails in bounded time, naming the missing site;
- a deployment run triggered on the Prefect server trains through the coordinator pool;
- a site whose pool has no worker is skipped at once, not after the deadline;
- a deployment of other code put in a site's pool is refused by the site's worker;
- ``mode: async`` runs through the same site sessions;
- secure aggregation runs its steps through the same site sessions, to the plain run's
  model up to its fixed-point rounding; a site killed between its shares and its masked
  update drops out and the round completes.

The coordinator runs on its tenant's S3 identity (``fedround env --tenant``), granted this
federation and the tenant's ledgers only, not the admin's: every scenario shows it suffices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from fedround.flows.services.stack import Endpoints
from fedround.site_workers.data import read_arrays, save_site_data
from fedround.site_workers.training import train_locally
from fedround.tasks.checkpoints import load_checkpoint
from fedround.tasks.core import keys
from fedround.tasks.core.config import load_federation_config
from fedround.tasks.core.models import build_model
from fedround.tasks.core.usercode import RoundContext, SiteDataset
from fedround.tasks.object_store import ObjectStoreSettings, S3ObjectStore

from .helpers import FEDROUND, Completed, cli_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BASE = Path(__file__).with_name("distributed.yaml")
FEDERATION = "e2e-dist"
TENANT = "test"  # distributed.yaml
SITES = ["site-a", "site-b", "site-c"]


def variant(tmp: Path, name: str, **changes: Any) -> Path:
    """The base config with some settings changed, written outside the repository (so it
    is recorded as an untracked config rather than refused as a dirty one)."""
    raw = yaml.safe_load(BASE.read_text())
    raw["contract"] = str((BASE.parent / raw["contract"]).resolve())
    for dotted, value in changes.items():
        section, _, leaf = dotted.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[leaf] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class Federation:
    services: Endpoints
    state_dir: Path
    site_configs: dict[str, Path]
    workers: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    configs: list[Path] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The coordinator's environment: its tenant's S3 identity (this federation and the
        tenant's ledgers only), not the admin's, so every run here shows it suffices."""
        return {**cli_env(self.state_dir), **self.services.tenant_env(TENANT, FEDERATION)}

    @property
    def store(self) -> S3ObjectStore:
        s = self.services
        return S3ObjectStore(
            s.s3_endpoint, s.s3_bucket, s.admin_access_key, s.admin_secret_key, region=s.s3_region
        )

    def start_worker(self, site: str) -> None:
        env = {**cli_env(self.state_dir), **self.services.site_env(FEDERATION, site)}
        self.workers[site] = subprocess.Popen(
            [FEDROUND, "site", "start", "--config", str(self.site_configs[site])],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(self.state_dir / f"worker-{site}.log").open("a"),
            text=True,
            start_new_session=True,
        )

    def kill_worker(self, site: str) -> None:
        """SIGKILL the site's worker and every flow-run process it started."""
        process = self.workers.pop(site)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def prefect(self) -> Any:
        """Point this test process's Prefect client at the stack's server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.services.prefect_api_url})

    def wait_for_live_workers(self, sites: list[str], timeout: float = 120) -> None:
        from prefect.client.orchestration import get_client

        config = load_federation_config(BASE)
        deadline = time.monotonic() + timeout
        with self.prefect(), get_client(sync_client=True) as client:
            for site in sites:
                while not client.read_workers_for_work_pool(config.work_pool(site)):
                    assert time.monotonic() < deadline, f"worker of {site} never registered"
                    time.sleep(0.5)

    def run(self, config: Path, *args: str, timeout: float = 600) -> Completed:
        done = subprocess.run(
            [FEDROUND, "run", str(config), "--distributed", "--json", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Completed(done.returncode, done.stdout, done.stderr)

    def start_run(self, config: Path, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [FEDROUND, "run", str(config), "--distributed", "--json", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def wait_for_key(
        self, key: str, process: subprocess.Popen[str] | None, timeout: float = 300
    ) -> None:
        store = self.store
        deadline = time.monotonic() + timeout
        while not store.exists(key):
            if process is not None:
                assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"{key} never appeared"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def federation(
    local_services: Endpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Federation]:
    from fedround.site_workers.demo_sites import provision_demo_sites
    from fedround.site_workers.signing_key import provision_site_keys
    from fedround.tasks.object_store import open_store
    from fedround.tasks.runtime import CoordinatorSettings

    state = tmp_path_factory.mktemp("distributed")
    config = load_federation_config(BASE)
    settings = CoordinatorSettings(
        state_dir=state,
        object_store=ObjectStoreSettings(kind="local", root=state / "unused"),
        tracking_uri=local_services.mlflow_tracking_uri,
        site_processes=1,
    )

    def site_store(site: str) -> ObjectStoreSettings:
        creds = local_services.site_credentials(FEDERATION, site)
        return ObjectStoreSettings.model_validate(creds.object_store_settings())

    paths = provision_demo_sites(config, settings, site_store, local_services.prefect_api_url)
    admin = ObjectStoreSettings(  # the coordinator's store: it holds the sites' public keys
        kind="s3",
        endpoint=local_services.s3_endpoint,
        bucket=local_services.s3_bucket,
        region=local_services.s3_region,
        access_key=local_services.admin_access_key,
        secret_key=local_services.admin_secret_key,
    )
    provision_site_keys(paths, open_store(admin), FEDERATION)
    fed = Federation(local_services, state, paths)
    deployed = subprocess.run(
        [FEDROUND, "deploy", str(BASE), "--project-dir", str(REPO)],
        env=fed.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    for site in SITES:
        fed.start_worker(site)
    try:
        fed.wait_for_live_workers(SITES)
        yield fed
    finally:
        for site in list(fed.workers):
            fed.kill_worker(site)


@pytest.fixture(scope="module")
def baseline(federation: Federation) -> dict[str, Any]:
    done = federation.run(BASE, "--run-id", "baseline")
    assert done.returncode == 0, done.stderr[-4000:]
    return done.result


@pytest.mark.security("tenant-isolation")
def test_distributed_run_matches_the_embedded_run(
    baseline: dict[str, Any], federation: Federation, tmp_path: Path
) -> None:
    # the coordinator ran on its tenant's S3 key (this federation, the tenant's ledgers)
    assert federation.env["FEDROUND_S3_ACCESS_KEY"] != federation.services.admin_access_key
    assert baseline["sites"]["participating"] == SITES
    assert baseline["sites"]["excluded"] == {}
    assert baseline["final_metrics"]["accuracy"] > 0.5
    overheads = [h["orchestration_overhead_seconds"] for h in baseline["history"]]
    assert len(overheads) == 3 and all(o > 0 for o in overheads)

    embedded = subprocess.run(
        [FEDROUND, "run", str(BASE), "--json"],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    embedded_result = json.loads(embedded.stdout.strip().splitlines()[-1])
    assert (
        embedded_result["checkpoint"]["weights_sha256"] == baseline["checkpoint"]["weights_sha256"]
    )


def test_each_site_served_its_rounds_in_its_own_pool(
    baseline: dict[str, Any], federation: Federation
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with federation.prefect(), get_client(sync_client=True) as client:
        for site in SITES:
            pool = f"{FEDERATION}-{site}"
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[pool])),
                limit=50,
            )
            mine = [r for r in runs if r.parameters.get("run_id") == "baseline"]
            assert mine, f"no session flow run of {site} for the baseline run"
            assert {r.work_pool_name for r in mine} == {pool}
            assert all(r.state_type.value == "COMPLETED" for r in mine)
            tasks = client.read_task_runs(limit=200)
            names = {t.name for t in tasks if t.flow_run_id == mine[0].id}
            assert {"round 1 · train", "round 2 · train", "round 3 · train"} <= names


def test_promotion_evaluates_in_each_sites_pool(
    baseline: dict[str, Any], federation: Federation
) -> None:
    done = subprocess.run(
        [FEDROUND, "promote", str(BASE), "--distributed", "--json"],
        env=federation.env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "promoted", result
    from mlflow import MlflowClient

    uri = federation.services.mlflow_tracking_uri
    production = MlflowClient(uri, uri).get_model_version_by_alias(
        f"{FEDERATION}-global", "production"
    )
    assert str(production.version) == baseline["model"]["version"]
    with federation.prefect():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        with get_client(sync_client=True) as client:
            for site in SITES:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(
                        name=DeploymentFilterName(any_=[f"{FEDERATION}-{site}"])
                    ),
                    limit=100,
                )
                evaluations = [r for r in runs if "evaluation_id" in r.parameters]
                assert evaluations, f"{site} evaluated nothing in its own pool"
                assert {r.work_pool_name for r in evaluations} == {f"{FEDERATION}-{site}"}


def test_killed_site_worker_is_left_out_then_rejoins(federation: Federation) -> None:
    config = variant(federation.state_dir, "kill-site", rounds=5)
    process = federation.start_run(config, "--run-id", "kill-site")
    federation.wait_for_key(keys.round_plan_key(FEDERATION, "kill-site", 2), process)
    federation.kill_worker("site-b")  # the worker and its session, during round 2
    federation.start_worker("site-b")
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    left_out = result["sites"]["left_out_in_rounds"]
    # Killed during round 2 (or just after uploading it): the first round that misses
    # site-b still completes with the other two, and it names why site-b is missing.
    missed = sorted(int(r) for r, sites in left_out.items() if "site-b" in sites)
    assert missed and missed[0] in (2, 3), left_out
    assert "session stopped answering" in left_out[str(missed[0])]["site-b"]
    assert set(left_out[str(missed[0])]) == {"site-b"}
    last = federation.store.get(
        keys.checkpoint_prefix(FEDERATION, "kill-site", 5) + "manifest.json"
    )
    assert json.loads(last)["sites"] == SITES  # site-b is back by the last round


def one_epoch_seconds(features: np.ndarray, labels: np.ndarray) -> float:
    """Seconds one local epoch over these arrays takes on this machine (one torch thread,
    as a site session trains)."""
    config = load_federation_config(BASE)
    model = build_model(config.model, seed=0)
    training = config.training.model_copy(update={"local_epochs": 1})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = SiteDataset(torch.from_numpy(features), torch.from_numpy(labels), num_classes=10)
        context = RoundContext(FEDERATION, "timing", "site-c", 1, seed=0, num_classes=10)
        result = train_locally(model, data, training, context)
    finally:
        torch.set_num_threads(threads)
    return result.seconds


def test_site_slower_than_the_deadline_is_left_out_and_its_late_update_rejected(
    federation: Federation,
) -> None:
    # A real cause of slowness: site-c holds 20 times more data than the others. The number
    # of local epochs is set from one epoch timed here, so that site-c needs about twice the
    # 15 s deadline on any machine (a fixed amount of work was too little on a fast one),
    # while the other sites still finish well within it: their first round in a session
    # also pays a fixed start-up cost, measured at 7-10 s on a loaded 2-core machine.
    deadline = 15
    shard = federation.site_configs["site-c"].parent / "train.npz"
    original = shard.read_bytes()
    arrays = read_arrays(shard)
    features, labels = np.tile(arrays["features"], (20, 1)), np.tile(arrays["labels"], 20)
    epochs = max(1, round(2 * deadline / one_epoch_seconds(features, labels)))
    save_site_data(shard, features, labels)
    config = variant(
        federation.state_dir,
        "slow-site",
        rounds=5,
        **{
            "selection.deadline_s": deadline,
            "selection.liveness_s": 60,
            "training.local_epochs": epochs,
        },
    )
    try:
        done = federation.run(config, "--run-id", "slow-site")
    finally:
        shard.write_bytes(original)
    assert done.returncode == 0, done.stderr[-4000:]
    left_out = done.result["sites"]["left_out_in_rounds"]
    assert f"missed the {deadline}s deadline for round 2" in left_out["2"]["site-c"]
    assert all(set(sites) == {"site-c"} for sites in left_out.values()), left_out
    late = done.result["sites"]["late_updates_rejected"]
    found = {which: why for found in late.values() for which, why in found.items()}
    assert any(which.startswith("site-c (round ") for which in found), late
    assert all("arrived after its round closed" in why for why in found.values()), late
    assert not any("site-a" in which or "site-b" in which for which in found), late


def test_killed_coordinator_resumes_to_identical_weights(
    baseline: dict[str, Any], federation: Federation
) -> None:
    process = federation.start_run(BASE, "--run-id", "coordinator-crash")
    federation.wait_for_key(
        keys.checkpoint_prefix(FEDERATION, "coordinator-crash", 1) + "manifest.json", process
    )
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    store = federation.store
    assert not store.exists(
        keys.checkpoint_prefix(FEDERATION, "coordinator-crash", 3) + "manifest.json"
    )
    resumed = federation.run(BASE, "--run-id", "coordinator-crash")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.result["resumed_from_round"] >= 1
    assert (
        resumed.result["checkpoint"]["weights_sha256"] == baseline["checkpoint"]["weights_sha256"]
    )


def test_async_rounds_run_through_the_same_site_sessions(
    federation: Federation, tmp_path: Path
) -> None:
    # Arrange: FedBuff, K = 2 of the three sites per global version
    config = variant(tmp_path, "async", **{"mode": "async", "rounds": 4, "async.buffer_size": 2})

    # Act
    done = federation.run(config, "--run-id", "async")

    # Assert: four versions, each from two validated updates that came through the
    # sessions (the run pointer assigned each site its version, one at a time)
    assert done.returncode == 0, done.stderr[-4000:]
    history = done.result["history"]
    assert [h["round"] for h in history] == [1, 2, 3, 4]
    assert all(h["sites_accepted"] >= 1 and h["examples"] > 0 for h in history)
    final = load_checkpoint(federation.store, FEDERATION, "async", 4)
    assert final.strategy_state["fedbuff"]["version"] == 4
    trained = [
        (round_, site)
        for round_ in range(1, 6)
        for site in SITES
        if federation.store.exists(keys.update_manifest_key(FEDERATION, "async", round_, site))
    ]
    assert len(trained) >= 8  # K × versions accepted, at least
    assert {site for _, site in trained} == set(SITES)


def test_secure_aggregation_runs_its_steps_through_the_same_site_sessions(
    baseline: dict[str, Any], federation: Federation, tmp_path: Path
) -> None:
    # Arrange: the baseline's config and seeds, with secure aggregation (t = 2 of 3)
    config = variant(tmp_path, "secagg", **{"secure_aggregation.enabled": True})

    # Act
    done = federation.run(config, "--run-id", "secagg")

    # Assert: every round summed all three sites' masked updates, and the model is the
    # baseline's plain FedAvg up to the fixed-point rounding
    assert done.returncode == 0, done.stderr[-4000:]
    history = done.result["history"]
    assert [h["secagg_sites"] for h in history] == [3.0, 3.0, 3.0]
    store = federation.store
    secure = load_checkpoint(store, FEDERATION, "secagg", 3).weights
    plain = load_checkpoint(store, FEDERATION, "baseline", 3).weights
    for name, tensor in plain.items():
        torch.testing.assert_close(secure[name], tensor, rtol=0, atol=1e-4)
    # Only masked updates left the sites: no plain update in any site's prefix
    for site in SITES:
        prefix = keys.update_prefix(FEDERATION, "secagg", 1, site)
        stored = store.list(prefix)
        assert not [key for key in stored if key.endswith("update.safetensors")]
        assert prefix + "secagg/masked.bin" in stored
    # Each step ran as a task of the site's session, visible in the Prefect UI
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with federation.prefect(), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[f"{FEDERATION}-site-a"])
            ),
            limit=50,
        )
        session = [r for r in runs if r.parameters.get("run_id") == "secagg"]
        assert session
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[session[0].id])), limit=200
        )
        names = {t.name for t in tasks}
    assert {
        "round 1 · train",
        "round 1 · secure shares",
        "round 1 · secure masked",
        "round 1 · secure unmask",
    } <= names


def test_a_site_killed_during_the_secure_steps_drops_out_and_the_round_completes(
    federation: Federation, tmp_path: Path
) -> None:
    # Arrange: secure aggregation, t = 2 of 3
    config = variant(tmp_path, "secagg-kill", rounds=4, **{"secure_aggregation.enabled": True})
    process = federation.start_run(config, "--run-id", "secagg-kill")

    # Act: site-b's worker dies right after it dealt its shares in round 2
    shares = keys.secagg_site_key(FEDERATION, "secagg-kill", 2, "site-b", "shares.json")
    federation.wait_for_key(shares, process)
    federation.kill_worker("site-b")
    federation.start_worker("site-b")

    # Assert: round 2 completes without site-b (its pair masks recovered from the other
    # two's shares; or, had it masked already, with its update in the sum and its
    # self-mask recovered), and no round is aborted
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    history = result["history"]
    assert [h["round"] for h in history] == [1, 2, 3, 4]
    assert not any(h.get("secagg_aborted") for h in history)
    second = history[1]
    assert second["secagg_sites"] in (2.0, 3.0)
    if second["secagg_sites"] == 2.0:
        reason = result["sites"]["left_out_in_rounds"]["2"]["site-b"]
        assert "dropped out at the masked step" in reason, reason
        assert second["secagg_dropped"] == 1.0
    assert result["final_metrics"]["accuracy"] > 0.3  # it learns (rejoining is shown above)


def test_deployment_run_trains_through_the_coordinator_pool(
    baseline: dict[str, Any], federation: Federation
) -> None:
    coordinator = subprocess.Popen(
        [FEDROUND, "coordinator", "start", str(BASE)],
        env=federation.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        triggered = subprocess.run(
            [
                str(Path(FEDROUND).with_name("prefect")),
                "deployment",
                "run",
                f"fedround-training/{FEDERATION}",
                "--param",
                f"config_path={BASE.relative_to(REPO)}",
                "--param",
                "run_id=from-deployment",
                "--watch",
                "--watch-timeout",
                "600",
            ],
            env=federation.env,
            capture_output=True,
            text=True,
            timeout=660,
            check=False,
        )
        assert triggered.returncode == 0, triggered.stdout[-3000:] + triggered.stderr[-3000:]
    finally:
        os.killpg(coordinator.pid, signal.SIGKILL)
        coordinator.wait(timeout=30)
    final = federation.store.get(
        keys.checkpoint_prefix(FEDERATION, "from-deployment", 3) + "manifest.json"
    )
    assert json.loads(final)["weights_sha256"] == baseline["checkpoint"]["weights_sha256"]


@pytest.mark.security("control-plane-code")
def test_a_site_worker_refuses_code_that_is_not_a_site_flow(federation: Federation) -> None:
    """Someone who can reach the Prefect API puts a deployment of other code in site-a's
    pool: site-a's worker marks its run crashed, saying what it runs, and runs nothing."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with federation.prefect(), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("foreign-code")
        client.create_deployment(
            flow_id=flow_id,
            name="in-site-a",
            work_pool_name=f"{FEDERATION}-site-a",
            entrypoint="fedround.flows.training:train_federation",
            parameters={"config_path": "/etc/passwd"},
        )
        run: Any = run_deployment("foreign-code/in-site-a", timeout=90)
        assert run.state is not None and run.state.type.value == "CRASHED", run.state
        assert "runs only" in (run.state.message or "")
        assert "fedround.site_workers.session:site_session" in (run.state.message or "")


@pytest.mark.security("control-plane-code", "tenant-isolation")
def test_a_site_worker_runs_only_what_its_coordinator_sealed_and_only_once(
    federation: Federation,
) -> None:
    """Anyone holding the Prefect credential (a site, another tenant's coordinator) runs
    site-a's own evaluation deployment: unsealed, sealed with another tenant's key, sealed
    for site-b's pool, or replayed, the worker marks the run crashed with the reason; the
    same run sealed by the federation's coordinator passes the check, once."""
    from prefect.deployments import run_deployment

    from fedround.flows.dispatch_key import load_dispatch_key, publish_dispatch_key
    from fedround.flows.distributed import EVALUATION_DEPLOYMENT, deployment_name
    from fedround.site_workers.session import EVALUATION_ENTRYPOINT
    from fedround.site_workers.site_round import EvalSpec
    from fedround.tasks.core.dispatch_seal import seal_parameters
    from fedround.tasks.core.signing import SigningKey

    coordinator = load_dispatch_key(TENANT, federation.state_dir)  # what its runs seal with
    publish_dispatch_key(federation.store, FEDERATION, TENANT, coordinator)
    pool = f"{FEDERATION}-site-a"
    spec = EvalSpec(
        federation=FEDERATION,
        site="site-a",
        model_key=f"{FEDERATION}/global/_evaluations/sealed/none.safetensors",
        model_sha256="0" * 64,
        model=load_federation_config(BASE).model,
    )
    plain = {"evaluation_id": "sealed-once", "spec": spec.model_dump(mode="json")}

    def sealed(key: SigningKey, for_pool: str = pool) -> dict[str, Any]:
        return seal_parameters(plain, key, entrypoint=EVALUATION_ENTRYPOINT, pool=for_pool)

    def run(parameters: dict[str, Any]) -> tuple[str, str]:
        flow_run: Any = run_deployment(
            deployment_name(EVALUATION_DEPLOYMENT, pool), parameters=parameters, timeout=90
        )
        assert flow_run.state is not None and flow_run.state.is_final(), flow_run.state
        return flow_run.state.type.value, flow_run.state.message or ""

    good = sealed(coordinator)
    with federation.prefect():
        refused = {
            "unsealed": run(plain),
            "another tenant's key": run(sealed(SigningKey.generate())),
            "sealed for site-b": run(sealed(coordinator, f"{FEDERATION}-site-b")),
        }
        first = run(good)
        replayed = run(good)
    expected = {
        "unsealed": "no coordinator seal",
        "another tenant's key": "not a dispatch key",
        "sealed for site-b": "made for",
    }
    for what, (state, message) in refused.items():
        assert state == "CRASHED" and expected[what] in message, (what, state, message)
    assert first[0] != "CRASHED", first  # the seal passed; the evaluation itself ran
    assert replayed[0] == "CRASHED" and "already used" in replayed[1], replayed


def test_site_without_a_worker_is_skipped_at_once(federation: Federation) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from fedround.flows.dispatch import SiteUnavailable
    from fedround.flows.distributed import DistributedDispatcher
    from fedround.tasks.core.config import FederationConfig

    raw = yaml.safe_load(BASE.read_text())
    raw["sites"].append({"name": "site-z"})  # a site whose pool exists but has no worker
    config = FederationConfig.model_validate(raw)
    with federation.prefect():
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name=config.work_pool("site-z"), type="process"))
        dispatcher = DistributedDispatcher(config, federation.store)
        assert dispatcher.pool_problem("site-a") is None
        assert "has no worker online" in (dispatcher.pool_problem("site-z") or "")
        dispatcher.open_run("skip-down-site", ["site-z"])
        started = time.monotonic()
        with pytest.raises(SiteUnavailable, match="no worker online"):
            dispatcher.check_contract("site-z", FEDERATION, "skip-down-site", timeout=120)
        assert time.monotonic() - started < 5
        dispatcher.close_run("failed")


def test_quorum_lost_fails_in_bounded_time_naming_the_site(federation: Federation) -> None:
    config = variant(federation.state_dir, "quorum", rounds=4, **{"selection.min_sites": 3})
    process = federation.start_run(config, "--run-id", "quorum-lost")
    federation.wait_for_key(keys.round_plan_key(FEDERATION, "quorum-lost", 2), process)
    killed_at = time.monotonic()
    federation.kill_worker("site-a")
    try:
        _, stderr = process.communicate(timeout=300)
        elapsed = time.monotonic() - killed_at
    finally:
        federation.start_worker("site-a")
    assert process.returncode == 1
    assert "quorum is 3" in stderr and "site-a" in stderr
    assert elapsed < 60  # liveness (6 s) + the round's close, not the 120 s deadline
