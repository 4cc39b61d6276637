"""Registry, promotion and rollback against the real MLflow server (artifacts on S3), the
real S3 server and the real Prefect server, with federated evaluation at three embedded
demo sites (each with its own S3 identity, evaluating on its own held-out data).

Models are registered directly (no federation run): a "good" model trained centrally for
two epochs and a "bad" one left at its random initialisation, so every gate decision is
known in advance. Each test uses its own registered model name in one federation. One test
promotes a table model (regression, gated on mae: lower is better) whose preprocessor is
published to the sites with the weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from minio import Minio

from fedround.tasks.audit import AuditLog
from fedround.tasks.core import keys
from fedround.tasks.core.config import (
    FederationConfig,
    ModelConfig,
    TableConfig,
    TrainingConfig,
    load_federation_config,
)
from fedround.tasks.core.errors import FedroundError
from fedround.tasks.core.models import build_model
from fedround.tasks.core.preprocessing import Preprocessor, merge_summaries, summarize_table
from fedround.tasks.core.serialization import Weights, sha256_hex, weights_to_bytes
from fedround.tasks.core.usercode import RoundContext, SiteDataset, resolve_model_config
from fedround.tasks.object_store import ObjectStoreSettings, S3ObjectStore, open_store
from fedround.tasks.registry import ModelRegistry, register_candidate
from fedround.tasks.tracking import RunTracker
from tests.services import Endpoints

FEDERATION = "promo-it"
SITES = ["site-a", "site-b", "site-c"]
SUITE = Path(__file__).resolve().parents[2] / "deployments/examples/contracts/mnist-site-data.json"


@dataclass
class World:
    services: Endpoints
    state: Path
    site_configs: dict[str, Path]
    good: Weights
    bad: Weights
    env: dict[str, str]
    runs: list[str] = field(default_factory=list)

    @property
    def tracking_uri(self) -> str:
        return self.services.mlflow_tracking_uri

    @property
    def store(self) -> S3ObjectStore:
        s = self.services
        return S3ObjectStore(
            s.s3_endpoint, s.s3_bucket, s.admin_access_key, s.admin_secret_key, region=s.s3_region
        )

    def config(self, model: str, extra: str = "", file: str | None = None) -> Path:
        """The federation config with its own registered model name (and extra settings)."""
        path = self.state / "configs" / f"{file or model}.yaml"
        path.parent.mkdir(exist_ok=True)
        (path.parent / "suite.json").write_bytes(SUITE.read_bytes())
        path.write_text(
            f"federation: {FEDERATION}\ntenant: acme\nrounds: 2\nseed: 5\n"
            "data: {source: mnist, train_size: 900, test_size: 600, split_seed: 42,"
            " partition: {kind: iid}}\n"
            "selection: {min_sites: 2, deadline_s: 120}\n"
            f"registry: {{model_name: {model}}}\n"
            "contract: suite.json\n"
            f"sites: [{', '.join('{name: ' + s + '}' for s in SITES)}]\n{extra}"
        )
        return path

    def register(
        self,
        model: str,
        weights: Weights,
        config_path: Path | None = None,
        model_config: ModelConfig | None = None,
        preprocessor: Preprocessor | None = None,
    ) -> str:
        existing = self.state / "configs" / f"{model}.yaml"
        config_path = config_path or (existing if existing.exists() else self.config(model))
        config = load_federation_config(config_path)
        run_id = f"{model}-{len(self.runs)}"
        self.runs.append(run_id)
        tracker = RunTracker.start(self.tracking_uri, config, run_id, tags={})
        registered = register_candidate(
            tracker,
            config,
            weights,
            {"fedround.run_id": run_id},
            model_config=model_config,
            preprocessor=preprocessor,
        )
        tracker.finish()
        return registered.version

    def registry(self, model: str) -> ModelRegistry:
        return ModelRegistry(self.tracking_uri, model)

    def audit(self, model: str) -> list[Any]:
        return AuditLog(self.store, FEDERATION).entries(model=model)


@pytest.fixture(scope="module")
def world(local_services: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Sites provisioned with their own S3 identities, one embedded dispatcher, the env."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from fedround.flows.dispatch import current_dispatcher
    from fedround.flows.local_sites import EmbeddedDispatcher
    from fedround.site_workers.data import TRAIN_FILE, load_dataset
    from fedround.site_workers.demo_sites import provision_demo_sites
    from fedround.site_workers.training import train_locally
    from fedround.tasks.core.config import DataConfig
    from fedround.tasks.runtime import CoordinatorSettings

    state = tmp_path_factory.mktemp("promotion")
    env = {
        **local_services.env(),
        "FEDROUND_STATE_DIR": str(state),
        "FEDROUND_SITE_PROCESSES": "2",
        "FEDROUND_ACTOR": "ml-engineer@test",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        seed_world = World(local_services, state, {}, {}, {}, env)
        config: FederationConfig = load_federation_config(seed_world.config("unused"))

        def site_store(site: str) -> ObjectStoreSettings:
            creds = local_services.site_credentials(FEDERATION, site)
            return ObjectStoreSettings.model_validate(creds.object_store_settings())

        site_configs = provision_demo_sites(config, CoordinatorSettings.from_env(), site_store)
        shards = [load_dataset(p.parent / TRAIN_FILE, DataConfig()) for p in site_configs.values()]
        features = torch.cat([s.features for s in shards])
        labels = torch.cat([s.labels for s in shards])
        model = build_model(ModelConfig(), seed=1)
        central = SiteDataset(features, labels, task="classification", num_classes=10)
        context = RoundContext(FEDERATION, run_id="central", site="central", round=1, seed=1)
        good = train_locally(model, central, TrainingConfig(local_epochs=2), context).weights
        bad = build_model(ModelConfig(), seed=2).state_dict()
        store = open_store(CoordinatorSettings.from_env().object_store)
        dispatcher = EmbeddedDispatcher(config, store, site_configs, 2)
        token = current_dispatcher.set(dispatcher)
        try:
            with temporary_settings(updates={PREFECT_API_URL: local_services.prefect_api_url}):
                yield World(local_services, state, site_configs, good, bad, env)
        finally:
            current_dispatcher.reset(token)
            dispatcher.close()


def promote(world: World, config: Path, **kwargs: Any) -> Any:
    from fedround.flows.promotion import promote_model

    return promote_model(config_path=str(config), **kwargs)


def rollback(world: World, config: Path, reason: str = "") -> Any:
    from fedround.flows.rollback import rollback_model

    return rollback_model(config_path=str(config), reason=reason)


# --- registration ---------------------------------------------------------------------


def test_registration_has_alias_lineage_semver_and_digest_tags(world: World) -> None:
    model = f"reg-{uuid.uuid4().hex[:6]}"
    first = world.register(model, world.good)
    registry = world.registry(model)
    version = registry.get(first)
    tags = version.tags
    assert registry.aliases() == {"candidate": first}
    assert tags["fedround.status"] == "candidate"
    assert tags["fedround.federation"] == FEDERATION and tags["fedround.tenant"] == "acme"
    assert tags["fedround.run_id"] == world.runs[-1]
    assert tags["fedround.weights_sha256"] == sha256_hex(weights_to_bytes(world.good))
    assert json.loads(tags["fedround.model_config"]) == ModelConfig().model_dump()
    assert (tags["fedround.semver"], tags["fedround.semver_change"]) == ("1.0.0", "first")
    verified = registry.verify(first)  # downloads from the MLflow server (artifacts in S3)
    assert verified.weights_bytes == weights_to_bytes(world.good)
    s = world.services
    objects = Minio(
        s.s3_endpoint, s.admin_access_key, s.admin_secret_key, secure=False, region=s.s3_region
    ).list_objects("mlflow", recursive=True)
    model_id = version.source.split("/")[-1]
    stored = [o.object_name for o in objects if model_id in str(o.object_name)]
    assert any(str(name).endswith("data/fedround/weights.safetensors") for name in stored)

    # a different architecture: a major version (minor and patch: unit tests and the e2e test)
    wide = world.config(model, "model: {conv1: 8}\n", file=f"{model}-wide")
    weights = build_model(ModelConfig(conv1=8), seed=3).state_dict()
    third = world.register(model, weights, wide)
    third_tags = registry.get(third).tags
    assert third_tags["fedround.semver"] == "2.0.0"
    assert third_tags["fedround.semver_change"] == "major"
    assert "architecture changed: conv1 16→8" in third_tags["fedround.semver_reason"]
    assert registry.aliases() == {"candidate": third}


# --- promotion and rollback -------------------------------------------------------------


@pytest.fixture(scope="module")
def promoted(world: World) -> dict[str, Any]:
    """bad v1 becomes the first production model, then good v2 replaces it."""
    model = f"pass-{uuid.uuid4().hex[:6]}"
    config = world.config(model)
    v1 = world.register(model, world.bad)
    first = promote(world, config)
    v2 = world.register(model, world.good)
    second = promote(world, config)
    return {"model": model, "config": config, "v1": v1, "v2": v2, "first": first, "second": second}


def test_first_production_is_explicit(promoted: dict[str, Any]) -> None:
    first = promoted["first"]
    assert first.outcome == "promoted" and first.previous_production is None
    assert first.decision["first_production"] is True
    assert [g["gate"] for g in first.decision["gates"]] == ["quorum"]
    assert "first production model" in first.message


def test_gate_pass_makes_production_and_deprecates_the_previous(
    world: World, promoted: dict[str, Any]
) -> None:
    model, v1, v2, second = promoted["model"], promoted["v1"], promoted["v2"], promoted["second"]
    assert second.outcome == "promoted" and second.previous_production == v1
    decision = second.decision
    assert decision["passed"] and decision["global_candidate"] > decision["global_production"] + 0.3
    assert set(decision["sites"]) == set(SITES)  # every site evaluated both models
    registry = world.registry(model)
    assert registry.aliases() == {"production": v2, "deprecated": v1}  # candidate consumed
    assert registry.get(v2).tags["fedround.status"] == "production"
    assert registry.get(v1).tags["fedround.status"] == "deprecated"
    assert registry.get(v1).tags["fedround.superseded_by"] == v2
    assert registry.production_history() == [v1, v2]
    entries = [e for e in world.audit(model) if e.action != "intent"]
    assert [(e.action, e.version, e.previous_production) for e in entries] == [
        ("promote", v1, None),
        ("promote", v2, v1),
    ]
    assert entries[-1].actor == "ml-engineer@test"
    assert entries[-1].details["figures"]["global_candidate"] == decision["global_candidate"]


def test_rollback_restores_the_previous_production(world: World, promoted: dict[str, Any]) -> None:
    model, v1, v2 = promoted["model"], promoted["v1"], promoted["v2"]
    result = rollback(world, promoted["config"], reason="accuracy complaints at site-b")
    assert (result.stage, result.rolled_back, result.production) == ("production", v2, v1)
    registry = world.registry(model)
    assert registry.aliases() == {"production": v1}
    assert registry.get(v2).tags["fedround.status"] == "rolled_back"
    assert registry.get(v1).tags["fedround.status"] == "production"
    assert registry.production_history() == [v1]
    last = world.audit(model)[-1]
    assert (last.action, last.version, last.previous_production) == ("rollback", v1, v2)
    assert last.reason == "accuracy complaints at site-b"
    with pytest.raises(FedroundError, match=r"no earlier production version"):
        rollback(world, promoted["config"])


def test_gate_fail_tags_the_version_and_keeps_production(world: World) -> None:
    model = f"fail-{uuid.uuid4().hex[:6]}"
    config = world.config(model)
    v1 = world.register(model, world.good)
    assert promote(world, config).outcome == "promoted"
    v2 = world.register(model, world.bad)
    result = promote(world, config)
    assert result.outcome == "rejected" and result.production == v1
    registry = world.registry(model)
    assert registry.aliases() == {"production": v1, "candidate": v2}
    tags = registry.get(v2).tags
    assert tags["fedround.status"] == "rejected"
    assert tags["fedround.gate_failed"] == "global_gain"
    figures = json.loads(tags["fedround.gate_figures"])
    assert figures["failed"] == ["global_gain", "site_regression"]
    assert figures["global_candidate"] < figures["global_production"]
    assert set(figures["sites"]) == set(SITES)
    entry = world.audit(model)[-1]
    assert (entry.action, entry.version, entry.details["gate"]) == ("reject", v2, "global_gain")


@pytest.mark.security("promotion-crash")
def test_tampered_or_missing_artifacts_are_refused(world: World) -> None:
    model = f"tamper-{uuid.uuid4().hex[:6]}"
    config = world.config(model)
    version = world.register(model, world.good)
    source = world.registry(model).get(version).source
    s = world.services
    client = Minio(
        s.s3_endpoint, s.admin_access_key, s.admin_secret_key, secure=False, region=s.s3_region
    )
    names = [
        str(o.object_name)
        for o in client.list_objects("mlflow", recursive=True)
        if source.split("/")[-1] in str(o.object_name)
    ]
    weights_key = next(n for n in names if n.endswith("weights.safetensors"))
    payload = client.get_object("mlflow", weights_key).read()
    tampered = payload[:-4] + b"\x00\x00\x80\x3f"
    import io

    client.put_object("mlflow", weights_key, io.BytesIO(tampered), len(tampered))
    with pytest.raises(FedroundError, match=r"fails its digest check: weights.safetensors"):
        promote(world, config)
    tags = world.registry(model).get(version).tags
    assert (tags["fedround.status"], tags["fedround.gate_failed"]) == ("rejected", "integrity")
    assert world.audit(model)[-1].details["gate"] == "integrity"
    assert "production" not in world.registry(model).aliases()

    for name in names:
        client.remove_object("mlflow", name)
    with pytest.raises(FedroundError, match=r"missing|cannot be downloaded"):
        world.registry(model).verify(version)


def test_staged_rollout_canary_first_then_everyone(world: World) -> None:
    model = f"canary-{uuid.uuid4().hex[:6]}"
    config = world.config(model, "promotion: {rollout: {canary: [site-a], min_soak_s: 0}}\n")
    v1 = world.register(model, world.bad)
    first = promote(world, config)
    assert first.outcome == "promoted"  # first production: no canary, nobody serves yet
    assert "no canary stage" in first.message
    v2 = world.register(model, world.good)
    canary = promote(world, config)
    assert (canary.outcome, canary.canary_sites) == ("canary", ["site-a"])
    registry = world.registry(model)
    assert registry.aliases() == {"production": v1, "production-site-a": v2, "candidate": v2}
    completed = promote(world, config)  # the check: site-a evaluates again, then everyone
    assert (completed.outcome, completed.stage) == ("promoted", "complete-rollout")
    assert set(completed.decision["sites"]) == {"site-a"}
    assert registry.aliases() == {"production": v2, "deprecated": v1}

    v3 = world.register(model, world.good)
    assert promote(world, config).outcome == "canary"
    stopped = rollback(world, config, reason="site-a reports errors")
    assert (stopped.stage, stopped.rolled_back, stopped.production) == ("canary", v3, v2)
    assert registry.aliases() == {"production": v2, "deprecated": v1, "candidate": v3}
    assert registry.get(v3).tags["fedround.status"] == "rolled_back"
    assert [e.action for e in world.audit(model) if e.action != "intent"] == [
        "promote",
        "canary",
        "promote",
        "canary",
        "rollback",
    ]


# --- a table model: its preprocessor travels with it, gates on mae ----------------------

TABLE = TableConfig(
    features=["size", "color"], categorical=["color"], label="price", task="regression"
)


def _rows(n: int, seed: int, shift: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    size = rng.normal(50.0 + shift, 10.0, n)
    color = rng.choice(["red", "green", "blue"], n)
    price = 3.0 * size + np.where(color == "red", 20.0, 0.0) + rng.normal(0.0, 1.0, n)
    return pd.DataFrame({"size": size, "color": color, "price": price})


def test_table_model_is_evaluated_with_its_preprocessor_and_gated_on_mae(world: World) -> None:
    """Three table sites (CSV files, their own S3 identities) evaluate a regression model
    with the preprocessor registered with it; the gates compare mae, lower is better."""
    import mlflow

    from fedround.flows.dispatch import current_dispatcher
    from fedround.flows.local_sites import EmbeddedDispatcher
    from fedround.site_workers.settings import SiteSettings, write_site_settings

    model = f"table-{uuid.uuid4().hex[:6]}"
    frames = {site: _rows(120, i, shift=5.0 * i) for i, site in enumerate(SITES)}
    site_configs = {}
    for site, frame in frames.items():
        folder = world.state / model / site
        folder.mkdir(parents=True)
        frame.iloc[:80].to_csv(folder / "train.csv", index=False)
        frame.iloc[80:].to_csv(folder / "test.csv", index=False)
        creds = world.services.site_credentials(FEDERATION, site)
        settings = SiteSettings(
            site=site,
            federation=FEDERATION,
            data_dir=folder,
            train_file="train.csv",
            test_file="test.csv",
            object_store=ObjectStoreSettings.model_validate(creds.object_store_settings()),
        )
        write_site_settings(folder / "site.yaml", settings)
        site_configs[site] = folder / "site.yaml"
    config_path = world.state / "configs" / f"{model}.yaml"
    (config_path.parent / "suite.json").write_bytes(SUITE.read_bytes())
    config_path.write_text(
        f"federation: {FEDERATION}\ntenant: acme\nrounds: 2\n"
        f"data: {{kind: table, source: sites, table: {TABLE.model_dump_json()}}}\n"
        "model: {factory: logistic_regression}\n"
        "evaluation: {metric: mae}\n"
        "selection: {min_sites: 2, deadline_s: 120}\n"
        f"registry: {{model_name: {model}}}\ncontract: suite.json\n"
        f"sites: [{', '.join('{name: ' + s + '}' for s in SITES)}]\n"
    )
    config = load_federation_config(config_path)
    train = [frame.iloc[:80] for frame in frames.values()]
    preprocessor = merge_summaries([summarize_table(f, TABLE) for f in train], TABLE)
    model_config = resolve_model_config(config.model, preprocessor.n_features, 1)
    # good: least squares on the preprocessed rows; bad: the factory's random start
    inputs, targets = preprocessor.transform(pd.concat(train))
    design = np.hstack([inputs, np.ones((len(inputs), 1), np.float32)]).astype(np.float64)
    solution = np.linalg.lstsq(design, targets.astype(np.float64), rcond=None)[0]
    good = {
        "weight": torch.tensor(solution[None, :-1], dtype=torch.float32),
        "bias": torch.tensor(solution[-1:], dtype=torch.float32),
    }
    bad = build_model(model_config, seed=2).state_dict()

    dispatcher = EmbeddedDispatcher(config, world.store, site_configs, 2)
    token = current_dispatcher.set(dispatcher)
    try:
        register = {"model_config": model_config, "preprocessor": preprocessor}
        v1 = world.register(model, bad, config_path, **register)
        first = promote(world, config_path)
        v2 = world.register(model, good, config_path, **register)
        second = promote(world, config_path)
    finally:
        current_dispatcher.reset(token)
        dispatcher.close()
    assert (first.outcome, first.production) == ("promoted", v1)
    assert (second.outcome, second.production, second.previous_production) == (
        "promoted",
        v2,
        v1,
    )
    decision = second.decision
    assert (decision["metric"], decision["direction"]) == ("mae", "lower")
    assert set(decision["sites"]) == set(SITES)
    assert decision["global_candidate"] < 2.0 < 50.0 < decision["global_production"]
    published = world.store.list(f"{FEDERATION}/global/evaluations/")
    assert any(k.endswith("/candidate.preprocessing.json") for k in published)

    # the production model, loaded from the MLflow server, serves raw rows
    mlflow.set_tracking_uri(world.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/{model}@production")
    held_out = frames["site-b"].iloc[80:]
    predicted = served.predict(held_out)
    assert list(predicted.index) == list(held_out.index)  # rows keep their index
    error = float((predicted["prediction"] - held_out["price"]).abs().mean())
    assert error == pytest.approx(decision["sites"]["site-b"]["candidate"], rel=1e-4)


# --- single writer ----------------------------------------------------------------------


def test_a_held_lock_refuses_a_promotion(world: World) -> None:
    from fedround.flows.promotion import promotion_lock

    model = f"held-{uuid.uuid4().hex[:6]}"
    config = world.config(model)
    world.register(model, world.good)
    other = promotion_lock(
        world.store, load_federation_config(config), "promote from elsewhere", "alice@ci-7"
    ).acquire()
    try:
        with pytest.raises(FedroundError, match=r"held by alice@ci-7 \(promote from elsewhere\)"):
            promote(world, config)
    finally:
        other.release()
    assert "production" not in world.registry(model).aliases()


DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from prefect import flow
    from fedround.flows.dispatch import current_dispatcher
    from fedround.flows.local_sites import EmbeddedDispatcher
    from fedround.flows.promotion import promote_model
    from fedround.tasks.core.config import load_federation_config
    from fedround.tasks.object_store import open_store
    from fedround.tasks.runtime import CoordinatorSettings

    config, sites, go = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    dispatcher = EmbeddedDispatcher(
        load_federation_config(Path(config)),
        open_store(CoordinatorSettings.from_env().object_store),
        {k: Path(v) for k, v in sites.items()},
        1,
    )
    current_dispatcher.set(dispatcher)

    @flow(name="warm-up")
    def warm_up():
        return 1

    warm_up()  # the Prefect client and server connection are ready before the start line
    print("READY", flush=True)
    while not go.exists():  # the start line: both drivers leave it together
        time.sleep(0.005)
    try:
        result = promote_model(config_path=config)
        print("RESULT " + json.dumps({"outcome": result.outcome}), flush=True)
    except Exception as exc:
        print("RESULT " + json.dumps({"error": type(exc).__name__, "message": str(exc)}),
              flush=True)
    finally:
        dispatcher.close()
    """
)


@pytest.mark.security("promotion-crash")
def test_concurrent_promotions_exactly_one_wins(world: World) -> None:
    model = f"race-{uuid.uuid4().hex[:6]}"
    config = world.config(model)
    version = world.register(model, world.good)
    go = world.state / f"go-{model}"
    sites = json.dumps({k: str(v) for k, v in world.site_configs.items()})
    env = {**os.environ, **world.env, "PREFECT_API_URL": world.services.prefect_api_url}
    drivers = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(config), sites, str(go)],
            env={**env, "FEDROUND_ACTOR": f"driver-{i}@test"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        for driver in drivers:
            assert driver.stdout is not None
            line = driver.stdout.readline()
            assert line.strip() == "READY", (line, driver.stderr.read() if driver.stderr else "")
        go.touch()
        outputs = [driver.communicate(timeout=300) for driver in drivers]
    finally:
        for driver in drivers:
            driver.kill()
    results = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out, _ in outputs]
    winners = [r for r in results if r.get("outcome") == "promoted"]
    losers = [r for r in results if "error" in r]
    assert len(winners) == 1 and len(losers) == 1, results
    # the loser met the winner's lock (or, had it been slower than a whole promotion, the
    # candidate already promoted): either way it changed nothing
    assert losers[0]["error"] in {"LockHeld", "LifecycleError"}, losers
    assert (
        "is held by driver-" in losers[0]["message"] or "already production" in losers[0]["message"]
    )
    assert world.registry(model).aliases() == {"production": version}
    assert [e.action for e in world.audit(model)] == ["intent", "promote"]
    assert not world.store.exists(keys.lock_key(FEDERATION, f"promotion-{model}"))
    print("loser:", losers[0]["message"][:200])


# --- crash consistency: intent → alias → outcome; a dead promotion's lock ----------------


class _Died(BaseException):
    """The promotion's process dies here."""


@pytest.mark.security("promotion-crash", "stale-lock")
def test_a_promotion_that_died_half_way_is_repaired_and_rollback_breaks_its_lock(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedround.flows.promotion import promotion_lock
    from fedround.tasks.audit import pending_intents
    from fedround.tasks.lifecycle import Lifecycle

    # Trigger: v1 is production; a promotion of v2 moves the alias and dies before it
    # records the outcome, leaving its lock (an hour's lease) behind
    model = f"crash-{uuid.uuid4().hex[:6]}"
    config = world.config(model)
    v1 = world.register(model, world.good)
    v2 = world.register(model, world.good)
    audit = AuditLog(world.store, FEDERATION)
    lock = promotion_lock(
        world.store, load_federation_config(config), f"promote {model} v2", "alice@ci-7"
    ).acquire()
    lifecycle = Lifecycle(world.registry(model), audit, lock)
    lifecycle.make_production(v1, None, "first production", {}, "evaluate")

    def die(*args: Any, **kwargs: Any) -> None:
        raise _Died

    monkeypatch.setattr(lifecycle, "_finish", die)
    with pytest.raises(_Died):
        lifecycle.make_production(v2, v1, "gates passed", {}, "evaluate")
    monkeypatch.undo()

    # Fault: production is v2 with no outcome audited, and the lock is still held
    assert world.registry(model).aliases()["production"] == v2
    assert [e.action for e in world.audit(model)] == ["intent", "promote", "intent"]
    with pytest.raises(FedroundError, match=r"held by alice@ci-7.*--break-lock --reason"):
        rollback(world, config, reason="v2 misbehaves")

    # Expected: an emergency rollback breaks the lock (audited), finishes the half-done
    # promotion from the registry's aliases, then rolls back; nothing is lost
    from fedround.flows.rollback import rollback_model

    result = rollback_model(
        config_path=str(config), reason="v2 misbehaves; alice's runner died", break_lock=True
    )
    assert (result.stage, result.rolled_back, result.production) == ("production", v2, v1)
    entries = world.audit(model)
    assert [e.action for e in entries] == [
        "intent",
        "promote",
        "intent",
        "lock-break",
        "promote",  # the repair
        "intent",
        "rollback",
    ]
    broke, repaired = entries[3], entries[4]
    assert broke.details["broken_lock"]["holder"] == "alice@ci-7"
    assert broke.actor == "ml-engineer@test" and "alice's runner died" in broke.reason
    assert repaired.details["repaired"] and repaired.details["intent"] == entries[2].sequence
    assert pending_intents(entries) == []
    registry = world.registry(model)
    assert registry.aliases() == {"production": v1}
    assert registry.production_history() == [v1]
    assert registry.get(v2).tags["fedround.status"] == "rolled_back"
    assert audit.verify() == []
    with pytest.raises(Exception, match="lost the lock"):
        lock.verify()  # alice's process, were it alive, could write nothing more


@pytest.mark.security("promotion-crash")
def test_promote_repair_records_a_promotion_that_died_before_the_alias_moved(
    world: World,
) -> None:
    from fedround.flows.promotion import promotion_lock, repair_promotions
    from fedround.tasks.lifecycle import Lifecycle

    model = f"abandon-{uuid.uuid4().hex[:6]}"
    config = world.config(model)
    v1 = world.register(model, world.good)
    audit = AuditLog(world.store, FEDERATION)
    with promotion_lock(world.store, load_federation_config(config), "promote") as lock:
        lock.acquire()
        lifecycle = Lifecycle(world.registry(model), audit, lock)
        lifecycle._intend("promote", v1, None, {"production": v1}, "gates passed", {})
        # ... and the process dies before the alias write

    written = repair_promotions(str(config))

    assert [e.action for e in written] == ["abandon"]
    assert written[0].details["aliases_found"] == {"production": None}
    assert "production" not in world.registry(model).aliases()
    assert repair_promotions(str(config)) == []  # nothing left to repair
