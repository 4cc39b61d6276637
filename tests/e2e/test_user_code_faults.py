"""Bring-your-own federation end to end: the user's code misbehaves at single sites.

Scenario (NVFlare-style): trigger → fault → expected state.
- Five sites bring their own ``.npz`` files and ``site.yaml`` (``data.source: sites``); the
  federation names a user package's ``train`` (installed only on the import path of the
  CLI and the site processes it spawns) and trains ``logistic_regression`` with FedProx.
- The user's ``train`` raises at site-c and leaves NaN weights at site-d: both are left out
  of every round with a reason naming ``train function <path>`` and what went wrong; the
  quorum of three still holds, the run finishes and registers a model.
- Nothing of the bad sites reaches the store or the model: no update from them, and the
  final checkpoint equals a FedAvg/FedProx computed here over the three good sites alone.
- A model factory that cannot be imported ends ``fedround run`` with one clear error line
  naming it, and no traceback.
- ``mode: async`` (FedBuff) over the same sites: the bad sites are left out of every global
  version with the same reasons, the good sites make every version; SIGKILLed after its
  second version, the run resumes from its checkpoint and finishes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from fedround.site_workers.data import load_dataset
from fedround.tasks.checkpoints import load_checkpoint
from fedround.tasks.core import keys
from fedround.tasks.core.config import load_federation_config
from fedround.tasks.core.hooks import hooks_for, hooks_installed
from fedround.tasks.core.models import build_model
from fedround.tasks.core.strategies import fedavg
from fedround.tasks.core.usercode import RoundContext, load_weights
from fedround.tasks.object_store import LocalObjectStore

from .helpers import FEDROUND, cli_env, run_user_federation, sites_yaml, write_array_federation

pytestmark = pytest.mark.slow

FEDERATION = "e2e-byo"
SITES = {"site-a": 60, "site-b": 40, "site-c": 50, "site-d": 30, "site-e": 70}
GOOD = ["site-a", "site-b", "site-e"]
TRAIN = "fr_e2e_user.fit:train"

USER_TRAIN = '''
"""A user's training loop: full-batch SGD on cross-entropy. It knows nothing of FedProx.
It fails on purpose at two sites, as user code at a real site might."""

import torch
import torch.nn.functional as F


def train(model, data, settings, context):
    if context.site == "site-c":
        raise RuntimeError("cannot reach the feature store")
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
    loss = torch.tensor(0.0)
    for _ in range(settings.local_epochs):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data.features), data.labels)
        loss.backward()
        optimizer.step()
    if context.site == "site-d":
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
    return {"loss": loss.item()}
'''

CONTRACT = {
    "name": "byo-arrays",
    "expectations": [
        {
            "type": "expect_table_columns_to_match_set",
            "kwargs": {
                "column_set": ["label", "n_features", "n_missing", "feature_min", "feature_max"],
                "exact_match": True,
            },
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "label", "value_set": [0, 1]},
        },
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "n_features", "min_value": 8, "max_value": 8},
        },
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "n_missing", "min_value": 0, "max_value": 0},
        },
    ],
}


ASYNC_VERSIONS = 6
ASYNC = "mode: async\nasync: {buffer_size: 2, max_staleness: 3}\n"


def federation_yaml(factory: str, extra: str = "") -> str:
    return (
        textwrap.dedent(
            f"""\
        federation: {FEDERATION}
        tenant: test
        seed: 3
        rounds: 2
        data: {{kind: arrays, source: sites}}
        model: {{factory: '{factory}', in_features: 8, out_features: 2}}
        training: {{train: '{TRAIN}', local_epochs: 5, learning_rate: 0.5, timeout_s: 120}}
        evaluation: {{holdout: holdout.npz}}
        strategy: {{name: fedprox, mu: 0.1}}
        selection: {{min_sites: 3, deadline_s: 300}}
        contract: contract.json
        sites: {sites_yaml(SITES)}
        """
        )
        + extra
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sites with their own files and site.yaml, a user package, the federation config."""
    return write_array_federation(
        tmp_path_factory.mktemp("byo"),
        FEDERATION,
        SITES,
        package="fr_e2e_user",
        modules={"fit": USER_TRAIN},
        contract=CONTRACT,
        configs={
            "federation.yaml": federation_yaml("logistic_regression"),
            "missing-factory.yaml": federation_yaml("fr_e2e_missing.models:build"),
            "async.yaml": federation_yaml("logistic_regression", ASYNC).replace(
                "rounds: 2", f"rounds: {ASYNC_VERSIONS}"
            ),
        },
    )


@pytest.fixture(scope="module")
def result(federation: Path) -> dict[str, Any]:
    done = run_user_federation(federation)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.result


def test_bad_sites_are_left_out_with_the_function_named(result: dict[str, Any]) -> None:
    left_out = result["sites"]["left_out_in_rounds"]
    assert sorted(left_out) == ["1", "2"]
    for reasons in left_out.values():
        assert sorted(reasons) == ["site-c", "site-d"]
        assert (
            f"train function {TRAIN} raised RuntimeError: cannot reach the feature store"
            in (reasons["site-c"])
        )
        assert f"train function {TRAIN} left non-finite weights in" in reasons["site-d"]
        assert "NaN or inf" in reasons["site-d"]


def test_the_run_finishes_on_the_good_sites_and_registers_a_model(
    result: dict[str, Any],
) -> None:
    assert result["rounds"] == 2
    assert result["sites"]["excluded"] == {}  # every contract passed: the faults are in code
    assert result["sites"]["participating"] == GOOD
    assert [h["sites_accepted"] for h in result["history"]] == [3.0, 3.0]
    assert result["final_metrics"]["accuracy"] > 0.8  # a linearly separable rule
    assert result["model"]["version"] == "1"
    uri = result["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(f"{FEDERATION}-global", "candidate")
    assert version.tags["fedround.weights_sha256"] == result["checkpoint"]["weights_sha256"]
    assert version.tags["fedround.sites"] == ",".join(GOOD)


def test_nothing_of_the_bad_sites_reaches_the_store_or_the_model(
    result: dict[str, Any], federation: Path
) -> None:
    # Prepare: FedProx over the three good sites alone, computed here with the same code
    sys.path.insert(0, str(federation / "user_pkg"))
    try:
        from fr_e2e_user.fit import train  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(federation / "user_pkg"))
    config = load_federation_config(federation / "fed" / "federation.yaml")
    weights = build_model(config.model, seed=config.seed).state_dict()
    for round_ in (1, 2):
        updates = []
        for site in GOOD:
            model = build_model(config.model, seed=0)
            load_weights(model, weights, config.model.import_path)
            data = load_dataset(federation / "sites" / site / "train.npz", config.data)
            context = RoundContext(FEDERATION, result["run_id"], site, round_, seed=0)
            with hooks_installed(model, hooks_for(config.strategy, weights)):
                train(model, data, config.training, context)
            delta = {k: v.detach() - weights[k] for k, v in model.state_dict().items()}
            updates.append((delta, SITES[site]))
        weights = fedavg(weights, updates)

    # Execute
    store = LocalObjectStore(federation / "state" / "objects")
    final = load_checkpoint(store, FEDERATION, result["run_id"], 2)  # verifies its digests

    # Assert
    assert final.manifest.sites == GOOD
    assert final.manifest.weights_sha256 == result["checkpoint"]["weights_sha256"]
    for name, tensor in final.weights.items():
        assert bool(torch.isfinite(tensor).all())
        assert torch.allclose(tensor, weights[name], atol=1e-5), name
    for round_ in (1, 2):
        for site in ("site-c", "site-d"):
            assert not store.exists(keys.update_key(FEDERATION, result["run_id"], round_, site))
        for site in GOOD:
            assert store.exists(keys.update_key(FEDERATION, result["run_id"], round_, site))


def test_a_factory_that_cannot_be_imported_fails_the_run_with_one_clear_line(
    federation: Path,
) -> None:
    # Prepare
    objects = federation / "state" / "objects" / FEDERATION
    before = sorted(objects.iterdir()) if objects.exists() else []

    # Execute
    done = run_user_federation(federation, "missing-factory.yaml")

    # Assert: it failed before the run asked any site for anything (no new run in the store)
    after = sorted(objects.iterdir()) if objects.exists() else []
    assert after == before
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "model factory fr_e2e_missing.models:build: cannot import module" in errors[0]
    assert "pip install" in errors[0]


@pytest.fixture(scope="module")
def async_result(federation: Path) -> dict[str, Any]:
    done = run_user_federation(federation, "async.yaml")
    assert done.returncode == 0, done.stderr[-4000:]
    return done.result


def test_async_rounds_leave_the_bad_sites_out_of_every_version(
    async_result: dict[str, Any], federation: Path
) -> None:
    history = async_result["history"]
    assert [h["round"] for h in history] == list(range(1, ASYNC_VERSIONS + 1))
    assert all(h["sites_accepted"] >= 1 and h["examples"] > 0 for h in history)
    assert all(0 <= h["staleness_max"] <= 3 for h in history)
    reasons = async_result["sites"]["left_out_in_rounds"]
    assert reasons, "the bad sites were never reported"
    seen = {site for per_version in reasons.values() for site in per_version}
    assert seen == {"site-c", "site-d"}  # in flight at the end too: verified and recorded
    for per_version in reasons.values():
        if "site-c" in per_version:
            assert f"train function {TRAIN} raised RuntimeError" in per_version["site-c"]
        if "site-d" in per_version:
            assert "non-finite" in per_version["site-d"] or "NaN" in per_version["site-d"]
    store = LocalObjectStore(federation / "state" / "objects")
    final = load_checkpoint(store, FEDERATION, async_result["run_id"], ASYNC_VERSIONS)
    assert final.strategy_state["fedbuff"]["version"] == ASYNC_VERSIONS
    assert not set(final.manifest.sites) & {"site-c", "site-d"}
    assert async_result["model"]["alias"] == "candidate"


def test_killed_async_run_resumes_from_its_last_version(
    async_result: dict[str, Any], federation: Path
) -> None:
    run_id = "async-crash"
    store = LocalObjectStore(federation / "state" / "objects")
    second = keys.checkpoint_prefix(FEDERATION, run_id, 2) + "manifest.json"
    env = cli_env(federation / "state")
    env["PYTHONPATH"] = str(federation / "user_pkg")
    argv = [FEDROUND, "run", str(federation / "fed" / "async.yaml"), "--run-id", run_id]
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not store.exists(second):
        assert process.poll() is None, "the async run ended before its second version"
        assert time.monotonic() < deadline, "version 2 was never committed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the coordinator, its site processes, Prefect
    process.wait()
    last = keys.checkpoint_prefix(FEDERATION, run_id, ASYNC_VERSIONS) + "manifest.json"
    assert not store.exists(last)

    resumed = run_user_federation(federation, "async.yaml", run_id=run_id)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.result["resumed_from_round"] >= 2
    final = load_checkpoint(store, FEDERATION, run_id, ASYNC_VERSIONS)
    assert final.strategy_state["fedbuff"]["version"] == ASYNC_VERSIONS
    assert [h["round"] for h in resumed.result["history"]] == list(range(1, ASYNC_VERSIONS + 1))
