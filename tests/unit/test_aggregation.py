"""Aggregation from the object store: validated, in site order, rejects recorded."""

from __future__ import annotations

from pathlib import Path

import torch

from fedround.tasks.aggregation import aggregate_updates
from fedround.tasks.core import keys
from fedround.tasks.core.fedavg import FedAvg, fedavg
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.serialization import sha256_hex, weights_to_bytes
from fedround.tasks.core.validation import UpdateExpectation, tensor_specs
from fedround.tasks.object_store import LocalObjectStore

GLOBAL = {"w": torch.zeros(4), "b": torch.zeros(2)}


def _upload(store: LocalObjectStore, site: str, delta: dict[str, torch.Tensor], n: int) -> None:
    payload = weights_to_bytes(delta)
    manifest = UpdateManifest(
        federation="fed",
        run_id="run",
        round=1,
        site=site,
        nonce="n1",
        num_examples=n,
        sha256=sha256_hex(payload),
        nbytes=len(payload),
    )
    store.put(keys.update_key("fed", "run", 1, site), payload)
    store.put(keys.update_manifest_key("fed", "run", 1, site), manifest.to_json())


def _expect(site: str) -> UpdateExpectation:
    return UpdateExpectation(
        federation="fed",
        run_id="run",
        round=1,
        nonce="n1",
        site=site,
        specs=tensor_specs(GLOBAL),
        max_bytes=1 << 20,
        max_num_examples=1000,
    )


def test_many_sites_aggregate_exactly_and_bad_ones_are_left_out(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    sites = [f"site-{i:02d}" for i in range(30)]
    good = []
    for i, site in enumerate(sites):
        delta = {"w": torch.full((4,), float(i % 5)), "b": torch.full((2,), float(-i % 3))}
        if site == "site-07":
            delta["w"][0] = float("nan")
        else:
            good.append((delta, i + 1))
        _upload(store, site, delta, i + 1)
    outcome = aggregate_updates(store, FedAvg(), GLOBAL, {s: _expect(s) for s in sites}, window=3)
    assert set(outcome.rejected) == {"site-07"}
    assert "not_finite" in outcome.rejected["site-07"]
    assert len(outcome.accepted) == 29
    assert outcome.total_examples == sum(n for _, n in good)
    expected = fedavg(GLOBAL, good)
    assert outcome.weights is not None
    for name in GLOBAL:
        assert torch.equal(outcome.weights[name], expected[name])


def test_missing_update_is_recorded_not_raised(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    _upload(store, "site-a", {"w": torch.ones(4), "b": torch.ones(2)}, 5)
    outcome = aggregate_updates(
        store, FedAvg(), GLOBAL, {s: _expect(s) for s in ("site-a", "site-b")}
    )
    assert list(outcome.accepted) == ["site-a"]
    assert outcome.rejected["site-b"].startswith("unreadable: no object")
