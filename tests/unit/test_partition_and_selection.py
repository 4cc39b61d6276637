"""Seeded Dirichlet partition and site selection are reproducible and complete."""

from __future__ import annotations

import numpy as np
import pytest

from fedround.tasks.core.partition import dirichlet_partition, iid_partition
from fedround.tasks.core.selection import derive_seed, select_sites

LABELS = np.repeat(np.arange(10), 100)


def test_dirichlet_partition_covers_every_example_once_and_is_seeded() -> None:
    shards = dirichlet_partition(LABELS, 10, alpha=0.5, seed=42, min_examples=10)
    joined = np.concatenate(shards)
    assert sorted(joined.tolist()) == list(range(len(LABELS)))
    assert min(len(s) for s in shards) >= 10
    again = dirichlet_partition(LABELS, 10, alpha=0.5, seed=42, min_examples=10)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    other = dirichlet_partition(LABELS, 10, alpha=0.5, seed=43, min_examples=10)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other, strict=True))


def test_low_alpha_is_non_iid() -> None:
    shards = dirichlet_partition(LABELS, 10, alpha=0.1, seed=0, min_examples=1)
    # With alpha=0.1 most sites are dominated by one or two labels.
    top_share = [np.bincount(LABELS[s], minlength=10).max() / len(s) for s in shards]
    assert np.median(top_share) > 0.4


def test_impossible_partition_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(LABELS[:20], 10, alpha=0.5, seed=0, min_examples=5)


def test_iid_partition_is_balanced() -> None:
    shards = iid_partition(1000, 3, seed=1)
    assert sorted(len(s) for s in shards) == [333, 333, 334]


def test_site_selection_is_seeded_per_round() -> None:
    sites = [f"s{i}" for i in range(10)]
    first = select_sites(sites, 0.3, 2, seed=7, round_=1)
    assert len(first) == 3 and first == sorted(first)
    assert first == select_sites(list(reversed(sites)), 0.3, 2, seed=7, round_=1)
    rounds = {tuple(select_sites(sites, 0.3, 2, seed=7, round_=r)) for r in range(1, 20)}
    assert len(rounds) > 1
    assert select_sites(sites, 0.1, 4, seed=7, round_=1).__len__() == 4
    assert select_sites(sites[:2], 1.0, 4, seed=7, round_=1) == ["s0", "s1"]


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(42, "train", 1, "a") == derive_seed(42, "train", 1, "a")
    assert derive_seed(42, "train", 1, "a") != derive_seed(42, "train", 1, "b")
    assert 0 <= derive_seed("x") < 2**63


def test_matching_partition_follows_each_sites_label_mix() -> None:
    from fedround.tasks.core.partition import matching_partition

    train_labels = np.array([0] * 90 + [1] * 10 + [1] * 100)
    reference = [np.arange(0, 100), np.arange(100, 200)]  # site 0: mostly 0s; site 1: only 1s
    test_labels = np.array([0] * 50 + [1] * 50)
    shards = matching_partition(test_labels, reference, seed=3, reference_labels=train_labels)
    assert sorted(np.concatenate(shards).tolist()) == list(range(100))
    site0 = test_labels[shards[0]]
    site1 = test_labels[shards[1]]
    assert (site0 == 0).sum() == 50 and (site1 == 0).sum() == 0  # all 0s go to site 0
    assert 3 <= (site0 == 1).sum() <= 6  # site 0 holds 10 of the 110 training 1s
