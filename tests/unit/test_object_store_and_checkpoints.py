"""The local object store and checkpoints: atomic, verified, refused when corrupted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedround.tasks.checkpoints import (
    committed_rounds,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedround.tasks.core import keys
from fedround.tasks.core.errors import CheckpointError, ObjectNotFound
from fedround.tasks.object_store import LocalObjectStore


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def test_put_get_list_delete(store: LocalObjectStore) -> None:
    store.put("fed/run/a.json", b"1")
    store.put("fed/run/sub/b.json", b"22")
    store.put("fed/other/c.json", b"3")
    assert store.get("fed/run/a.json") == b"1"
    assert store.size("fed/run/sub/b.json") == 2
    assert store.list("fed/run/") == ["fed/run/a.json", "fed/run/sub/b.json"]
    store.put("fed/run/a.json", b"replaced")
    assert store.get("fed/run/a.json") == b"replaced"
    store.delete("fed/run/a.json")
    assert not store.exists("fed/run/a.json")
    with pytest.raises(ObjectNotFound):
        store.get("fed/run/a.json")
    assert not list((store.root / "fed/run").glob(".*.tmp"))  # no temp files left behind


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
@pytest.mark.security("untrusted-site-objects")
def test_keys_cannot_escape_the_store(store: LocalObjectStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        store.put(key, b"x")


def _save(store: LocalObjectStore, round_: int, value: float) -> None:
    save_checkpoint(
        store,
        federation="fed",
        run_id="run",
        round_=round_,
        weights={"w": torch.full((3,), value)},
        strategy="fedavg",
        strategy_state={"step": round_},
        config_sha256="c" * 64,
        metrics={"accuracy": value},
        sites=["a"],
    )


def test_checkpoint_round_trip_and_latest(store: LocalObjectStore) -> None:
    assert latest_checkpoint(store, "fed", "run") is None
    for r in range(3):
        _save(store, r, float(r))
    assert committed_rounds(store, "fed", "run") == [0, 1, 2]
    latest = latest_checkpoint(store, "fed", "run")
    assert latest is not None and latest.round == 2
    assert torch.equal(latest.weights["w"], torch.full((3,), 2.0))
    assert latest.strategy_state == {"step": 2}
    assert latest.manifest.metrics == {"accuracy": 2.0}


def test_checkpoint_without_manifest_is_not_committed(store: LocalObjectStore) -> None:
    _save(store, 0, 0.0)
    _save(store, 1, 1.0)
    store.delete(keys.checkpoint_prefix("fed", "run", 1) + "manifest.json")  # crash before commit
    latest = latest_checkpoint(store, "fed", "run")
    assert latest is not None and latest.round == 0


def test_corrupted_checkpoint_is_refused_with_a_clear_error(store: LocalObjectStore) -> None:
    _save(store, 0, 0.0)
    weights_key = keys.checkpoint_prefix("fed", "run", 0) + "weights.safetensors"
    data = bytearray(store.get(weights_key))
    data[-1] ^= 0xFF
    store.put(weights_key, bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(store, "fed", "run", 0)
    message = str(info.value)
    assert "checkpoint round 0 of run run is corrupted" in message
    assert "weights.safetensors" in message and "Restore it from a backup" in message


def test_missing_checkpoint_names_the_round(store: LocalObjectStore) -> None:
    with pytest.raises(CheckpointError, match="no committed checkpoint for round 4"):
        load_checkpoint(store, "fed", "run", 4)


def test_site_config_round_trips_its_secret_and_is_private(tmp_path: Path) -> None:
    from fedround.site_workers.settings import SiteSettings, load_site_settings, write_site_settings
    from fedround.tasks.object_store import ObjectStoreSettings

    path = tmp_path / "site" / "site.yaml"
    write_site_settings(
        path,
        SiteSettings(
            site="site-a",
            federation="fed",
            data_dir=tmp_path,
            object_store=ObjectStoreSettings(
                kind="s3", endpoint="127.0.0.1:1", bucket="b", access_key="a", secret_key="s3cr3t"
            ),
        ),
    )
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = load_site_settings(path)
    assert loaded.object_store.secret_key is not None
    assert loaded.object_store.secret_key.get_secret_value() == "s3cr3t"
