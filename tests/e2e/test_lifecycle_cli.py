"""The model lifecycle through the real ``fedround`` command line, as an ML engineer runs it.

A federation-config repository (git + a DVC-tracked folder, the DVC remote on the S3
server) is cloned fresh and pulled; ``fedround run`` trains from it on the embedded sites
with the object store on S3, MLflow and Prefect on their servers, and records the exact
revision; a modified config is refused; ``fedround promote`` makes the first production
model; a fine-tune (``--init-from models:/…@production``) gets a patch version, is
promoted, its ``lineage`` printed, ``rollback`` restores the first; the audit log is
intact and retention keeps the checkpoints behind registered versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.integration.dvc_repo import fresh_clone, make_config_repo, sh
from tests.services import Endpoints

from .helpers import FEDROUND, Completed

pytestmark = pytest.mark.slow

FEDERATION = "lifecycle-e2e"
MODEL = f"{FEDERATION}-global"
CONFIG = f"""\
federation: {FEDERATION}
tenant: acme
seed: 11
rounds: 2
data: {{source: mnist, train_size: 900, test_size: 300, split_seed: 42, partition: {{kind: iid}}}}
selection: {{min_sites: 2, deadline_s: 300}}
# end to end, the pipeline matters, not the gates (they have their own tests): always pass
promotion: {{min_gain: -1.0, max_site_drop: 1.0}}
contract: contracts/mnist-site-data.json
sites: [{{name: site-a}}, {{name: site-b}}, {{name: site-c}}]
"""


class Engineer:
    """Runs ``fedround`` commands against the service stack, like a user's shell would."""

    def __init__(self, services: Endpoints, state: Path) -> None:
        self.services = services
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
            **services.env(),
            "FEDROUND_STATE_DIR": str(state),
            "FEDROUND_SITE_PROCESSES": "2",
            "FEDROUND_ACTOR": "ml-engineer@e2e",
        }
        self.client = MlflowClient(
            tracking_uri=services.mlflow_tracking_uri, registry_uri=services.mlflow_tracking_uri
        )

    def __call__(self, *args: str, timeout: float = 600) -> Completed:
        done = subprocess.run(
            [FEDROUND, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Completed(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def engineer(local_services: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> Engineer:
    return Engineer(local_services, tmp_path_factory.mktemp("lifecycle-state"))


@pytest.fixture(scope="module")
def config(local_services: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("federation-configs")
    origin, _ = make_config_repo(root, local_services, CONFIG)
    clone = fresh_clone(origin, root / "clone", local_services)
    return clone / "federation" / "federation.yaml"


@pytest.fixture(scope="module")
def first_run(engineer: Engineer, config: Path) -> dict[str, Any]:
    done = engineer("run", str(config), "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    return done.result


def test_run_records_the_config_revision_from_the_dvc_clone(
    engineer: Engineer, config: Path, first_run: dict[str, Any]
) -> None:
    repo = config.parents[1]
    head = sh("git", "rev-parse", "HEAD", cwd=repo)
    md5 = hashlib.md5(config.read_bytes()).hexdigest()
    run = engineer.client.get_run(first_run["mlflow"]["run_id"])
    tags = run.data.tags
    assert tags["fedround.config_revision"] == f"git:{head[:12]} dvc:{md5[:12]}"
    assert tags["fedround.config_git_commit"] == head
    assert tags["fedround.config_dvc_md5"] == md5
    assert tags["fedround.config_dirty"] == "false"
    assert tags["fedround.tenant"] == "acme"  # through the MLflow run-context plugin too
    version = engineer.client.get_model_version(MODEL, first_run["model"]["version"])
    assert version.tags["fedround.config_revision"] == tags["fedround.config_revision"]
    assert version.tags["fedround.weights_sha256"] == first_run["checkpoint"]["weights_sha256"]
    assert version.tags["fedround.semver"] == "1.0.0"
    artifacts = {a.path for a in engineer.client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/accuracy.png", "plots/loss.png"}
    metrics = run.data.metrics
    assert metrics["cost.tenant.acme.bytes_up"] == sum(
        metrics[f"cost.site.{s}.bytes_up"] for s in ("site-a", "site-b", "site-c")
    )
    assert metrics["cost.site.site-a.compute_seconds"] > 0


def test_a_modified_config_is_refused(engineer: Engineer, config: Path) -> None:
    original = config.read_text()
    config.write_text(original.replace("rounds: 2", "rounds: 3"))
    try:
        done = engineer("run", str(config), timeout=120)
    finally:
        config.write_text(original)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "refusing to start from an uncommitted config" in done.stderr
    assert "federation/federation.yaml modified since the last `dvc add`" in done.stderr
    assert "Traceback" not in done.stderr


def test_promote_fine_tune_lineage_and_rollback(
    engineer: Engineer, config: Path, first_run: dict[str, Any]
) -> None:
    v1 = first_run["model"]["version"]
    promoted = engineer("promote", str(config), "--json")
    assert promoted.returncode == 0, promoted.stderr[-4000:]
    assert promoted.result["outcome"] == "promoted" and promoted.result["version"] == v1

    tuned = engineer("run", str(config), "--init-from", f"models:/{MODEL}@production", "--json")
    assert tuned.returncode == 0, tuned.stderr[-4000:]
    v2 = tuned.result["model"]["version"]
    version = engineer.client.get_model_version(MODEL, v2)
    assert version.tags["fedround.parent_version"] == v1
    assert (version.tags["fedround.semver"], version.tags["fedround.semver_change"]) == (
        "1.0.1",
        "patch",
    )
    second = engineer("promote", str(config), "--json")
    assert second.returncode == 0, second.stderr[-4000:]
    assert second.result["previous_production"] == v1

    lineage = engineer("lineage", MODEL, v2, "--verify", "--json")
    assert lineage.returncode == 0, lineage.stderr[-3000:]
    found = json.loads(lineage.stdout.strip().splitlines()[-1])
    assert found["semver"] == "1.0.1" and found["parent"] == v1
    assert found["config"]["config_revision"].startswith("git:")
    assert found["sites"]["participating"] == ["site-a", "site-b", "site-c"]
    assert {s: c["success"] for s, c in found["contracts"].items()} == {
        "site-a": True,
        "site-b": True,
        "site-c": True,
    }
    assert found["rounds"]["completed"] == 2 and found["privacy"] == "not recorded"
    assert [c["round"] for c in found["checkpoints"]] == [0, 1, 2]
    assert all(c["verified"] for c in found["checkpoints"])
    assert found["checkpoints"][-1]["registered_weights"] is True
    assert [(p["action"], p["version"]) for p in found["promotions"]] == [("promote", v2)]
    assert found["cost"]["tenant"] == "acme" and found["cost"]["tenant_total"]["bytes_up"] > 0

    text = engineer("lineage", MODEL, "@production")
    assert text.returncode == 0 and f"{MODEL} version {v2} (1.0.1)" in text.stdout
    assert "Privacy budget\n  not recorded" in text.stdout

    back = engineer("rollback", str(config), "--reason", "e2e", "--json")
    assert back.returncode == 0, back.stderr[-3000:]
    assert (back.result["rolled_back"], back.result["production"]) == (v2, v1)
    aliases = engineer.client.get_registered_model(MODEL).aliases
    assert aliases == {"production": v1}

    audit = engineer("audit", FEDERATION, "--verify")
    assert audit.returncode == 0, audit.stderr
    actions = [json.loads(line)["action"] for line in audit.stdout.splitlines()]
    lifecycle = [a for a in actions if a != "key-register"]  # first use of the sites' keys
    assert lifecycle == ["intent", "promote", "intent", "promote", "intent", "rollback"]
    assert actions.index("intent") == actions.count("key-register") > 0
    assert "audit log intact" in audit.stderr

    pruned = engineer(
        "checkpoints", "prune", "--older-than", "0s", "--federation", FEDERATION, "--json"
    )
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    report = json.loads(pruned.stdout.strip().splitlines()[-1])
    # kept: each run's final checkpoint, and the fine-tune's round 0, which holds v1's weights
    assert sorted(report["kept_registered"].values()) == [
        [f"{MODEL}/{v1}"],
        [f"{MODEL}/{v1}"],
        [f"{MODEL}/{v2}"],
    ]
    assert len(report["deleted"]) == 3  # rounds 0 and 1 of the first run, round 1 of the tune
    after = json.loads(engineer("lineage", MODEL, v1, "--json").stdout.strip().splitlines()[-1])
    assert [c["status"] for c in after["checkpoints"]] == [
        "pruned or never committed",
        "pruned or never committed",
        "present",
    ]
