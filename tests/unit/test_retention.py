"""Checkpoint pruning: each run's latest checkpoint survives any age, and pruning refuses
to run without the model registry's protection (local object store, a real MLflow
registry in sqlite; an unreachable one at ``http://127.0.0.1:9``).

The same pruning against the real S3 and MLflow servers is tested in
tests/integration/test_lifecycle_s3.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedround.flows.cli.main import app
from fedround.tasks.checkpoints import MANIFEST, load_checkpoint, save_checkpoint
from fedround.tasks.core import keys
from fedround.tasks.core.manifest import CheckpointManifest
from fedround.tasks.object_store import LocalObjectStore
from fedround.tasks.retention import (
    PruneRefused,
    find_checkpoints,
    parse_age,
    protected_digests,
    prune_checkpoints,
)

pytestmark = pytest.mark.security("prune-loses-models")

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once


def _checkpoint(
    store: LocalObjectStore,
    federation: str,
    run_id: str,
    round_: int,
    age: timedelta = timedelta(0),
) -> CheckpointManifest:
    manifest = save_checkpoint(
        store,
        federation=federation,
        run_id=run_id,
        round_=round_,
        weights={"w": torch.full((3, 2), float(round_)), "b": torch.tensor([float(round_)])},
        strategy="fedavg",
        strategy_state={"round": round_},
        config_sha256="c" * 64,
    )
    if age:  # an old checkpoint: rewrite its manifest's creation time
        manifest = manifest.model_copy(update={"created_at": datetime.now(UTC) - age})
        store.put(keys.checkpoint_prefix(federation, run_id, round_) + MANIFEST, manifest.to_json())
    return manifest


def _left(store: LocalObjectStore) -> set[tuple[str, str, int]]:
    return {(r.federation, r.run_id, r.round) for r in find_checkpoints(store)}


def _snapshot(store: LocalObjectStore) -> dict[str, bytes]:
    return {key: store.get(key) for key in store.list("")}


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture(scope="module")
def empty_registry_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow sqlite database (migrating takes seconds: done once)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("registry") / "mlflow.db"
    uri = f"sqlite:///{path}"
    assert MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions() == []
    return path


@pytest.fixture
def registry(empty_registry_db: Path, tmp_path: Path) -> str:
    """The tracking URI of a fresh, empty registry of this test's own."""
    path = tmp_path / "mlflow.db"
    shutil.copy(empty_registry_db, path)
    return f"sqlite:///{path}"


def _register(tracking_uri: str, name: str, digest: str) -> str:
    """Register a model version carrying ``digest`` as its weights digest; its version."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.create_registered_model(name)
    version = client.create_model_version(
        name, source="file:///nowhere", tags={"fedround.weights_sha256": digest}
    )
    return str(version.version)


@pytest.fixture
def no_mlflow_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow retries a refused connection for minutes by default. Not a mock: this only
    bounds MLflow's own retry policy, the request really goes out and really fails."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def test_zero_age_keeps_the_latest_checkpoint_of_every_run(store: LocalObjectStore) -> None:
    for round_ in range(4):  # a live run: its checkpoints were all just written
        _checkpoint(store, "f1", "run-a", round_)
    for round_ in (1, 2):
        _checkpoint(store, "f1", "run-b", round_, age=timedelta(days=400))
    _checkpoint(store, "f2", "run-c", 1, age=timedelta(days=400))

    report = prune_checkpoints(store, {"d" * 64: ["other/1"]}, parse_age("0s"))

    assert _left(store) == {("f1", "run-a", 3), ("f1", "run-b", 2), ("f2", "run-c", 1)}
    assert sorted((r.federation, r.run_id, r.round) for r in report.kept_latest) == [
        ("f1", "run-a", 3),
        ("f1", "run-b", 2),
        ("f2", "run-c", 1),
    ]
    assert sorted((r.run_id, r.round) for r in report.deleted) == [
        ("run-a", 0),
        ("run-a", 1),
        ("run-a", 2),
        ("run-b", 1),
    ]
    assert report.kept_recent == 0
    for prefix in (keys.checkpoint_prefix("f1", "run-a", r) for r in (0, 1, 2)):
        assert store.list(prefix) == []  # every file of a pruned checkpoint is gone
    assert load_checkpoint(store, "f1", "run-a", 3).manifest.round == 3  # still verifies


def test_the_newest_readable_checkpoint_is_kept_when_the_latest_manifest_is_broken(
    store: LocalObjectStore,
) -> None:
    old = timedelta(days=400)
    for round_ in (1, 2, 3):
        _checkpoint(store, "f", "run", round_, age=old)
    store.put(keys.checkpoint_prefix("f", "run", 3) + MANIFEST, b"{not json")

    report = prune_checkpoints(store, {"d" * 64: ["other/1"]}, timedelta(days=90))

    assert [(r.run_id, r.round) for r in report.kept_unreadable] == [("run", 3)]
    assert [(r.run_id, r.round) for r in report.kept_latest] == [("run", 2)]
    assert [(r.run_id, r.round) for r in report.deleted] == [("run", 1)]
    load_checkpoint(store, "f", "run", 2)  # the run can still resume from round 2


def test_checkpoints_behind_registered_versions_are_kept(
    store: LocalObjectStore, registry: str
) -> None:
    old = timedelta(days=400)
    registered = _checkpoint(store, "f", "run", 1, age=old)
    for round_ in (2, 3):
        _checkpoint(store, "f", "run", round_, age=old)
    version = _register(registry, "f-global", registered.weights_sha256)

    digests = protected_digests(registry)
    assert digests == {registered.weights_sha256: [f"f-global/{version}"]}
    report = prune_checkpoints(store, digests, timedelta(days=90))

    assert _left(store) == {("f", "run", 1), ("f", "run", 3)}
    assert report.kept_registered == {keys.checkpoint_prefix("f", "run", 1): ["f-global/1"]}
    assert [(r.run_id, r.round) for r in report.deleted] == [("run", 2)]
    assert [(r.run_id, r.round) for r in report.kept_latest] == [("run", 3)]


def test_an_empty_registry_refuses_to_prune_and_deletes_nothing(
    store: LocalObjectStore, registry: str
) -> None:
    old = timedelta(days=400)
    for round_ in (1, 2, 3):
        _checkpoint(store, "f", "run", round_, age=old)
    before = _snapshot(store)

    digests = protected_digests(registry)  # the registry answers: no versions at all
    assert digests == {}
    for dry_run in (True, False):
        with pytest.raises(PruneRefused, match="nothing was deleted") as refused:
            prune_checkpoints(store, digests, timedelta(0), dry_run=dry_run)
        assert "--no-registry-check" in str(refused.value)
        assert "3 checkpoints exist in all federations" in str(refused.value)
    assert _snapshot(store) == before

    # the operator's explicit override: prunes, still keeping the run's latest
    report = prune_checkpoints(store, digests, timedelta(days=90), registry_check=False)
    assert _left(store) == {("f", "run", 3)}
    assert len(report.deleted) == 2


def test_an_empty_registry_and_no_checkpoints_is_not_refused(
    store: LocalObjectStore, registry: str
) -> None:
    _checkpoint(store, "other", "run", 1, age=timedelta(days=400))
    report = prune_checkpoints(store, protected_digests(registry), timedelta(0), federation="f")
    assert report.deleted == [] and report.kept_latest == []  # nothing in federation f
    with pytest.raises(PruneRefused, match="1 checkpoints exist in federation other"):
        prune_checkpoints(store, {}, timedelta(0), federation="other")


@pytest.mark.usefixtures("no_mlflow_retries")
@pytest.mark.security("secrets-in-logs")
def test_an_unreachable_registry_refuses_without_showing_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(PruneRefused, match="could not be read") as refused:
        protected_digests("http://alice:s3cret@127.0.0.1:9")
    message = str(refused.value)
    assert "nothing was deleted" in message and "--no-registry-check" in message
    assert "http://***@127.0.0.1:9" in message and "s3cret" not in message

    with caplog.at_level(logging.WARNING, logger="fedround.tasks.retention"):
        assert protected_digests(UNREACHABLE, registry_check=False) == {}
    assert "could not be read" in caplog.text


# --- the command line ---------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state dir with a local object store; the CLI's environment is put back afterwards."""
    saved = dict(os.environ)
    monkeypatch.delenv("FEDROUND_OBJECT_STORE", raising=False)
    state = tmp_path / "state"
    yield state
    os.environ.clear()
    os.environ.update(saved)


def _prune(state: Path, *options: str) -> tuple[int, str, str, BaseException | None]:
    result = CliRunner().invoke(
        app,
        ["checkpoints", "prune", "--older-than", "0s", "--state-dir", str(state)]
        + ([] if "--all-federations" in options else ["--federation", "f"])
        + list(options),
    )
    return result.exit_code, result.stdout, result.stderr, result.exception


def test_cli_prune_refuses_on_an_empty_registry_unless_told_not_to_check(
    cli: Path, registry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    store = LocalObjectStore(cli / "objects")
    for round_ in (1, 2):
        _checkpoint(store, "f", "run", round_)
    before = _snapshot(store)

    code, _, stderr, exception = _prune(cli)
    assert code == 1 and isinstance(exception, SystemExit)  # an error message, no traceback
    assert "nothing was deleted" in stderr and "Traceback" not in stderr
    assert _snapshot(store) == before

    code, stdout, stderr, _ = _prune(cli, "--no-registry-check", "--json")
    assert code == 0, stderr
    assert "the model registry protects no checkpoint" in stderr
    assert "  deleted  f/run/round-0001" in stdout
    assert "  kept     f/run/round-0002 (latest checkpoint of its run)" in stdout
    assert json.loads(stdout.splitlines()[-1])["kept_latest"] == ["f/run/round-0002"]
    assert _left(store) == {("f", "run", 2)}


@pytest.mark.usefixtures("no_mlflow_retries")
def test_cli_prune_refuses_when_the_registry_is_unreachable(
    cli: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    store = LocalObjectStore(cli / "objects")
    _checkpoint(store, "f", "run", 1, age=timedelta(days=400))
    _checkpoint(store, "f", "run", 2, age=timedelta(days=400))

    code, _, stderr, exception = _prune(cli)
    assert code == 1 and isinstance(exception, SystemExit)
    assert f"the model registry at {UNREACHABLE} could not be read" in stderr
    assert "nothing was deleted" in stderr and "Traceback" not in stderr
    assert _left(store) == {("f", "run", 1), ("f", "run", 2)}


# --- open runs, the prune lock, and the federation's scope ---------------------------------


def test_a_run_still_open_keeps_every_checkpoint(store: LocalObjectStore) -> None:
    from fedround.tasks.run_lock import RunLease

    for round_ in (1, 2, 3):
        _checkpoint(store, "f", "live", round_, age=timedelta(days=400))
        _checkpoint(store, "f", "done", round_, age=timedelta(days=400))
    lease = RunLease(store, "f", "live", ttl_s=60).acquire()
    try:
        report = prune_checkpoints(store, {"d" * 64: ["other/1"]}, timedelta(0), federation="f")
    finally:
        lease.release()
    assert sorted(r.round for r in report.kept_open) == [1, 2, 3]
    assert _left(store) == {("f", "live", 1), ("f", "live", 2), ("f", "live", 3), ("f", "done", 3)}

    # once the run has ended (its lock released), its old checkpoints go like any others
    report = prune_checkpoints(store, {"d" * 64: ["other/1"]}, timedelta(0), federation="f")
    assert report.kept_open == []
    assert _left(store) == {("f", "live", 3), ("f", "done", 3)}


def test_a_second_prune_of_a_federation_fails_naming_the_first(store: LocalObjectStore) -> None:
    from fedround.tasks.locks import Lock, LockHeld

    for round_ in (1, 2):
        _checkpoint(store, "f", "run", round_, age=timedelta(days=400))
    first = Lock(store, keys.lock_key("f", "prune"), ttl_s=60, holder="ops@other", purpose="p")
    first.acquire()
    try:
        with pytest.raises(LockHeld, match="ops@other"):
            prune_checkpoints(store, {"d" * 64: ["other/1"]}, timedelta(0), federation="f")
        assert _left(store) == {("f", "run", 1), ("f", "run", 2)}  # nothing deleted
        # a dry run only reads: it needs no lock
        dry = prune_checkpoints(store, {"d" * 64: ["x/1"]}, timedelta(0), "f", dry_run=True)
        assert [r.round for r in dry.deleted] == [1]
    finally:
        first.release()
    prune_checkpoints(store, {"d" * 64: ["other/1"]}, timedelta(0), federation="f")
    assert _left(store) == {("f", "run", 2)}
    assert not store.exists(keys.lock_key("f", "prune"))  # released after the prune


def test_cli_prune_needs_a_federation_or_all_federations(cli: Path) -> None:
    store = LocalObjectStore(cli / "objects")
    _checkpoint(store, "f", "run", 1, age=timedelta(days=400))
    _checkpoint(store, "f", "run", 2, age=timedelta(days=400))
    for options in ([], ["--federation", "f", "--all-federations"]):
        result = CliRunner().invoke(
            app, ["checkpoints", "prune", "--state-dir", str(cli), "--older-than", "0s", *options]
        )
        assert result.exit_code == 2, result.stdout
        assert "--federation NAME" in result.stderr and "--all-federations" in result.stderr
    assert _left(store) == {("f", "run", 1), ("f", "run", 2)}
    code, stdout, stderr, _ = _prune(cli, "--all-federations", "--no-registry-check")
    assert code == 0, stderr
    assert "  deleted  f/run/round-0001" in stdout
    assert _left(store) == {("f", "run", 2)}
