"""MLflow, for real (sqlite backend, the embedded default): a run gets its metrics and the
global model is registered as a new version with alias ``candidate``, a pyfunc model that
serves raw inputs (MNIST arrays; table rows with the federation's preprocessing) and still
passes its integrity check after MLflow loaded it in place."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from fedround.tasks.core.config import FederationConfig, TableConfig, parse_federation_config
from fedround.tasks.core.models import build_model
from fedround.tasks.core.preprocessing import Preprocessor, merge_summaries, summarize_table
from fedround.tasks.core.serialization import sha256_hex, weights_to_bytes
from fedround.tasks.core.usercode import resolve_model_config
from fedround.tasks.registry import (
    MLFLOW_BOOKKEEPING,
    ModelRegistry,
    RegistryError,
    register_candidate,
)
from fedround.tasks.tracking import RunTracker

CONFIG = parse_federation_config(
    "federation: registry-test\ncontract: c.json\nsites: [{name: a}, {name: b}]\n"
)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite tracking store (and local artifact root) for the module: creating its
    tables takes seconds. Each test uses its own federation, so its own model name."""
    return tmp_path_factory.mktemp("mlflow")


def _tracker(root: Path, config: FederationConfig, run_id: str) -> tuple[str, RunTracker]:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = RunTracker.start(
        uri,
        config,
        run_id,
        tags={"fedround.federation": config.federation},
        artifact_root=root / "artifacts",
    )
    mlflow.set_tracking_uri(uri)
    return uri, tracker


def _folder(registry: ModelRegistry, version: str) -> Path:
    """The logged model's folder in the local artifact store (what MLflow loads in place)."""
    uri = registry.client.get_model_version_download_uri(registry.name, version)
    return Path(urlparse(uri).path)


def test_candidate_registration_round_trip(tracking: Path) -> None:
    uri, tracker = _tracker(tracking, CONFIG, "run-1")
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

    # the version is a pyfunc model: raw pixels in, logits out (the torch model's, exactly)
    loaded = mlflow.pyfunc.load_model("models:/registry-test-global@candidate")
    original = build_model(CONFIG.model, seed=3).eval()
    pixels = np.random.default_rng(1).uniform(0, 255, (5, 784)).astype("f4")
    logits = loaded.predict(pixels)
    assert isinstance(logits, np.ndarray) and logits.shape == (5, 10)
    with torch.no_grad():
        expected = original(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert isinstance(loaded.get_raw_model(), torch.nn.Module)
    signature = loaded.metadata.signature
    assert signature is not None
    assert [(s.type, s.shape) for s in signature.inputs.inputs] == [(np.float32, (-1, 784))]
    assert [(s.type, s.shape) for s in signature.outputs.inputs] == [(np.float32, (-1, 10))]
    example = loaded.input_example
    assert isinstance(example, np.ndarray)
    assert example.shape == (2, 784) and example.dtype == np.float32 and not example.any()
    requirements = mlflow.pyfunc.get_model_dependencies(
        "models:/registry-test-global/1", format="pip"
    )
    pins = Path(requirements).read_text().split()
    assert "torch==2.13.0" in pins and "mlflow==3.17.2" in pins
    assert any(p.startswith("fedround==") for p in pins)


def test_loading_the_candidate_in_place_keeps_its_integrity(tracking: Path) -> None:
    """register → ``mlflow.pyfunc.load_model("models:/...@candidate")`` and predict (on the
    local artifact store MLflow writes ``registered_model_meta`` into the model's folder)
    → the integrity check promotion runs first still passes; a real change is refused."""
    config = parse_federation_config(
        "federation: registry-inplace\ncontract: c.json\nsites: [{name: a}, {name: b}]\n"
    )
    uri, tracker = _tracker(tracking, config, "run-2")
    weights = build_model(config.model, seed=4).state_dict()
    registered = register_candidate(tracker, config, weights, {"fedround.run_id": "run-2"})
    tracker.finish()
    model = mlflow.pyfunc.load_model("models:/registry-inplace-global@candidate")
    assert model.predict(np.zeros((3, 784), np.float32)).shape == (3, 10)

    registry = ModelRegistry(uri, "registry-inplace-global")
    folder = _folder(registry, registered.version)
    assert {p.name for p in folder.iterdir()} >= MLFLOW_BOOKKEEPING  # MLflow wrote it here
    verified = registry.verify(registered.version)  # promotion's first step
    assert verified.weights_bytes == weights_to_bytes(weights)
    assert verified.preprocessor is None

    (folder / "notes.txt").write_text("anything else in the model's folder counts")
    with pytest.raises(RegistryError, match="files of the logged model changed since registration"):
        registry.verify(registered.version)
    (folder / "notes.txt").unlink()
    registry.verify(registered.version)
    weights_file = next(folder.rglob("weights.safetensors"))
    weights_file.write_bytes(weights_file.read_bytes()[:-4] + b"\x00\x00\x80\x3f")
    with pytest.raises(RegistryError, match=r"fails its digest check: weights\.safetensors"):
        registry.verify(registered.version)
    with pytest.raises(Exception, match="the weights were altered"):
        mlflow.pyfunc.load_model("models:/registry-inplace-global@candidate")


def _table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    size = rng.normal(50.0, 10.0, rows)
    color = rng.choice(["red", "green", "blue"], rows)
    score = 0.08 * (size - 50.0) + np.where(color == "red", 1.5, -0.5)
    return pd.DataFrame(
        {
            "size": size,
            "color": color,
            "label": np.where(score + rng.normal(0, 0.3, rows) > 0, "buy", "skip"),
            "price": 3.0 * size + np.where(color == "red", 20.0, 0.0),
        }
    )


def _table_config(task: str, factory: str) -> tuple[FederationConfig, Preprocessor]:
    label = "label" if task == "classification" else "price"
    table = TableConfig(features=["size", "color"], categorical=["color"], label=label, task=task)
    config = parse_federation_config(
        f"federation: table-{task[:5]}\ncontract: c.json\nsites: [{{name: a}}, {{name: b}}]\n"
        "data: {kind: table, source: sites, table: "
        + table.model_dump_json()
        + f"}}\nmodel: {{factory: {factory}}}\n"
    )
    frames = [_table(150, 1), _table(150, 2)]  # two sites' summaries, merged
    preprocessor = merge_summaries([summarize_table(f, table) for f in frames], table)
    return config, preprocessor


@pytest.mark.parametrize(
    ("task", "factory"), [("classification", "mlp"), ("regression", "logistic_regression")]
)
def test_table_model_serves_raw_rows_with_its_preprocessing(
    tracking: Path, task: str, factory: str
) -> None:
    config, preprocessor = _table_config(task, factory)
    model_config = resolve_model_config(
        config.model, preprocessor.n_features, preprocessor.n_outputs
    )
    network = build_model(model_config, seed=7).eval()
    uri, tracker = _tracker(tracking, config, "run-t")
    registered = register_candidate(
        tracker,
        config,
        network.state_dict(),
        {"fedround.run_id": "run-t"},
        model_config=model_config,
        preprocessor=preprocessor,
    )
    tracker.finish()

    name = config.model_name
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    rows = _table(6, 9)
    rows.loc[0, "color"] = "purple"  # unseen: maps to the "other" column
    rows.loc[1, "size"] = np.nan  # missing: the federated mean
    predicted = loaded.predict(rows)  # the label columns are ignored
    with torch.no_grad():
        outputs = network(torch.from_numpy(preprocessor.transform_features(rows))).numpy()
    assert isinstance(predicted, pd.DataFrame) and len(predicted) == 6
    if task == "classification":
        assert list(predicted.columns) == [
            "prediction",
            "probability_buy",
            "probability_skip",
        ]
        assert preprocessor.classes == ["buy", "skip"]
        expected = [preprocessor.classes[i] for i in outputs.argmax(axis=1)]
        assert predicted["prediction"].tolist() == expected
        probabilities = predicted[["probability_buy", "probability_skip"]].to_numpy()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(
            probabilities, torch.softmax(torch.from_numpy(outputs), 1).numpy(), atol=1e-5
        )
    else:
        assert list(predicted.columns) == ["prediction"]
        np.testing.assert_allclose(predicted["prediction"].to_numpy(), outputs[:, 0], atol=1e-5)

    # the signature takes the declared raw columns; the example is built from the
    # preprocessor's metadata (federated means, first vocabulary value), never from rows
    signature = loaded.metadata.signature
    assert signature is not None
    assert signature.inputs.input_names() == ["size", "color"]
    example = loaded.input_example
    assert isinstance(example, pd.DataFrame) and list(example.columns) == ["size", "color"]
    assert example["size"].tolist() == [preprocessor.means["size"]] * 2
    assert example["color"].tolist() == [preprocessor.vocabularies["color"][0]] * 2

    registry = ModelRegistry(uri, name)
    tags = registry.get(registered.version).tags
    assert tags["fedround.preprocessing_sha256"] == preprocessor.sha256()
    assert tags["fedround.weights_sha256"] == sha256_hex(weights_to_bytes(network.state_dict()))
    verified = registry.verify(registered.version)
    assert verified.preprocessor == preprocessor
    assert verified.model_config == model_config
    assert verified.model_config.kwargs["in_features"] == preprocessor.n_features

    folder = _folder(registry, registered.version)
    stored = next(folder.rglob("preprocessing.json"))
    stored.write_text(stored.read_text().replace('"red"', '"RED"'))
    with pytest.raises(RegistryError, match="files of the logged model changed"):
        registry.verify(registered.version)
    # without the artifacts digest, the preprocessor's own digest still catches it
    registry.client.delete_model_version_tag(name, registered.version, "fedround.artifacts_sha256")
    with pytest.raises(RegistryError, match=r"preprocessing.json has sha256 \w+…, the version's"):
        registry.verify(registered.version)
    with pytest.raises(Exception, match="does not match the preprocessor digest"):
        mlflow.pyfunc.load_model(f"models:/{name}@candidate")


def test_resumed_training_run_reuses_its_mlflow_run(tracking: Path) -> None:
    uri = f"sqlite:///{tracking / 'mlflow.db'}"
    first = RunTracker.start(uri, CONFIG, "run-7", tags={}, artifact_root=tracking / "a")
    first.finish("FAILED")
    second = RunTracker.start(uri, CONFIG, "run-7", tags={}, artifact_root=tracking / "a")
    assert second.mlflow_run_id == first.mlflow_run_id
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(second.mlflow_run_id).data.tags["fedround.resumed"] == "true"


def test_finishing_a_run_flushes_its_own_store_and_writes_nothing_in_the_working_folder(
    tracking: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No global tracking URI (a coordinator that registered nothing): finishing must flush
    # this run's queued metrics, not MLflow's default ./mlflow.db (which it would create).
    config = parse_federation_config(
        "federation: finish-test\ncontract: c.json\nsites: [{name: a}, {name: b}]\n"
    )
    uri, tracker = _tracker(tracking, config, "run-f")
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracker.log_metrics({f"site.s{i}.seconds": float(i) for i in range(1500)}, step=1, wait=False)
    tracker.finish()
    assert not (tmp_path / "mlflow.db").exists()
    run = MlflowClient(tracking_uri=uri).get_run(tracker.mlflow_run_id)
    assert run.info.status == "FINISHED" and len(run.data.metrics) == 1500
