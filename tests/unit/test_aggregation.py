"""Aggregation from the object store: validated, in site order, rejects recorded; two
passes (preview, fold) for round-level rules; robust aggregators hold the round."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedround.tasks.aggregation import aggregate_updates
from fedround.tasks.core import keys
from fedround.tasks.core.config import StrategyConfig
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.serialization import sha256_hex, weights_from_bytes, weights_to_bytes
from fedround.tasks.core.strategies import build_strategy, fedavg
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
    outcome = aggregate_updates(
        store, build_strategy("fedavg"), GLOBAL, {s: _expect(s) for s in sites}, window=3
    )
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
        store, build_strategy("fedavg"), GLOBAL, {s: _expect(s) for s in ("site-a", "site-b")}
    )
    assert list(outcome.accepted) == ["site-a"]
    assert outcome.rejected["site-b"].startswith("unreadable: no object")


def _honest_and_boosted(store: LocalObjectStore) -> list[str]:
    """Five sites with small updates and one that boosts its update 100×."""
    sites = []
    for i in range(6):
        site = f"site-{i}"
        scale = 100.0 if i == 3 else 1.0
        delta = {"w": torch.full((4,), scale * (1 + i % 2)), "b": torch.full((2,), scale)}
        _upload(store, site, delta, 10 + i)
        sites.append(site)
    return sites


def test_median_clipping_cuts_the_boosted_site_and_reads_each_update_once(
    tmp_path: Path,
) -> None:
    # Prepare
    store = LocalObjectStore(tmp_path)
    sites = _honest_and_boosted(store)
    reads: list[str] = []
    get = store.get
    store.get = lambda key, max_bytes=None: reads.append(key) or get(key, max_bytes)  # type: ignore[method-assign]
    # Execute: the default strategy (clip to 5 × the round's median norm)
    outcome = aggregate_updates(
        store, build_strategy("fedavg"), GLOBAL, {s: _expect(s) for s in sites}
    )
    # Assert: only site-3 is clipped, to the bound; every update was downloaded once
    assert list(outcome.clipped) == ["site-3"]
    norm = (4 * 200.0**2 + 2 * 100.0**2) ** 0.5
    assert outcome.clipped["site-3"] == pytest.approx(outcome.stats["clip_bound"] / norm)
    assert outcome.stats["clip_bound"] == pytest.approx(5 * outcome.stats["median_update_norm"])
    assert sum(key.endswith("update.safetensors") for key in reads) == 6


def test_second_pass_reads_again_when_the_cache_is_full_with_the_same_result(
    tmp_path: Path,
) -> None:
    store = LocalObjectStore(tmp_path)
    sites = _honest_and_boosted(store)
    expectations = {s: _expect(s) for s in sites}
    cached = aggregate_updates(store, build_strategy("fedavg"), GLOBAL, expectations)
    reread = aggregate_updates(store, build_strategy("fedavg"), GLOBAL, expectations, cache_bytes=0)
    assert cached.weights is not None and reread.weights is not None
    for name in GLOBAL:
        assert torch.equal(cached.weights[name], reread.weights[name])


def test_an_update_replaced_between_the_passes_is_left_out_and_the_round_redone(
    tmp_path: Path,
) -> None:
    # Prepare: site-1 overwrites its update after the first pass validated it.
    store = LocalObjectStore(tmp_path)
    sites = _honest_and_boosted(store)
    key = keys.update_key("fed", "run", 1, "site-1")
    get = store.get
    served: dict[str, int] = {}

    def get_and_tamper(k: str, max_bytes: int | None = None) -> bytes:
        served[k] = served.get(k, 0) + 1
        if k == key and served[k] == 2:  # the second read of site-1 sees other bytes
            return weights_to_bytes({"w": torch.full((4,), 1e6), "b": torch.zeros(2)})
        return get(k, max_bytes)

    store.get = get_and_tamper  # type: ignore[method-assign]
    # Execute
    outcome = aggregate_updates(
        store, build_strategy("fedavg"), GLOBAL, {s: _expect(s) for s in sites}, cache_bytes=0
    )
    # Assert: site-1 is rejected, the others are aggregated as if it had never sent
    assert outcome.rejected["site-1"].startswith("changed during aggregation: digest_mismatch")
    assert sorted(outcome.accepted) == [s for s in sites if s != "site-1"]
    clean = LocalObjectStore(tmp_path / "clean")
    for site in sites:
        if site != "site-1":
            _upload(
                clean,
                site,
                weights_from_bytes(get(keys.update_key("fed", "run", 1, site))),
                10 + int(site[-1]),
            )
    expected = aggregate_updates(
        clean, build_strategy("fedavg"), GLOBAL, {s: _expect(s) for s in sites if s != "site-1"}
    )
    assert outcome.weights is not None and expected.weights is not None
    for name in GLOBAL:
        assert torch.equal(outcome.weights[name], expected.weights[name])


def test_krum_from_the_store_leaves_the_outlier_out(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    sites = _honest_and_boosted(store)
    strategy = build_strategy(StrategyConfig(aggregator="multi_krum", krum_f=1, multi_krum_m=4))
    outcome = aggregate_updates(store, strategy, GLOBAL, {s: _expect(s) for s in sites})
    assert "site-3" in outcome.unselected
    assert len(outcome.unselected) == 2
    assert outcome.weights is not None
    assert outcome.weights["b"].tolist() == [1.0, 1.0]  # every selected update has b = 1


def test_krum_with_too_few_valid_updates_gives_no_model_and_says_why(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    for site in ("site-a", "site-b", "site-c"):
        _upload(store, site, {"w": torch.ones(4), "b": torch.ones(2)}, 5)
    outcome = aggregate_updates(
        store,
        build_strategy(StrategyConfig(aggregator="krum")),
        GLOBAL,
        {s: _expect(s) for s in ("site-a", "site-b", "site-c")},
    )
    assert outcome.weights is None
    assert len(outcome.accepted) == 3
    assert (
        outcome.error is not None and "more than 2·f + 2 = 4 valid updates, got 3" in outcome.error
    )
