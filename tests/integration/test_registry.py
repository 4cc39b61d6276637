"""MLflow, for real (sqlite backend, the embedded default): a run gets its metrics and the
global model is registered as a new version with alias ``candidate``."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient

from fedround.tasks.core.config import parse_federation_config
from fedround.tasks.core.models import build_model
from fedround.tasks.registry import register_candidate
from fedround.tasks.tracking import RunTracker

CONFIG = parse_federation_config(
    "federation: registry-test\ncontract: c.json\nsites: [{name: a}, {name: b}]\n"
)


def test_candidate_registration_round_trip(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker.start(
        uri,
        CONFIG,
        "run-1",
        tags={"fedround.federation": "registry-test"},
        artifact_root=tmp_path / "artifacts",
    )
    tracker.log_metrics({"accuracy": 0.5}, step=1)
    tracker.log_metrics({"accuracy": 0.75}, step=2)
    weights = build_model(CONFIG.model, seed=3).state_dict()
    registered = register_candidate(tracker, CONFIG, weights, {"fedround.run_id": "run-1"})
    tracker.finish()

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("registry-test-global", "candidate")
    assert str(version.version) == registered.version == "1"
    assert version.tags["fedround.run_id"] == "run-1"
    history = client.get_metric_history(tracker.mlflow_run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    run = client.get_run(tracker.mlflow_run_id)
    assert run.data.params["training.learning_rate"] == "0.05"
    assert run.data.tags["fedround.run_id"] == "run-1"

    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/registry-test-global@candidate")
    original = build_model(CONFIG.model, seed=3).eval()
    pixels = torch.from_numpy(np.random.default_rng(1).uniform(0, 255, (5, 784)).astype("f4"))
    with torch.no_grad():
        assert torch.allclose(loaded(pixels), original(pixels), atol=1e-5)


def test_resumed_training_run_reuses_its_mlflow_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = RunTracker.start(uri, CONFIG, "run-7", tags={}, artifact_root=tmp_path / "a")
    first.finish("FAILED")
    second = RunTracker.start(uri, CONFIG, "run-7", tags={}, artifact_root=tmp_path / "a")
    assert second.mlflow_run_id == first.mlflow_run_id
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(second.mlflow_run_id).data.tags["fedround.resumed"] == "true"
