"""Seeded non-IID partitioning of a labelled dataset across sites."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


def dirichlet_partition(
    labels: npt.ArrayLike, n_sites: int, alpha: float, seed: int, min_examples: int = 1
) -> list[IntArray]:
    """Split example indices across ``n_sites`` with per-class Dirichlet(alpha) proportions.

    Each class is divided among the sites by a fresh Dirichlet draw, so low ``alpha``
    gives each site a few dominant labels. Draws repeat (same seeded generator) until every
    site holds at least ``min_examples``. Returns sorted index arrays, one per site.
    """
    y = np.asarray(labels)
    if n_sites < 1:
        raise ValueError("n_sites must be at least 1")
    if n_sites * min_examples > len(y):
        raise ValueError(f"{len(y)} examples cannot give {n_sites} sites {min_examples} each")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(n_sites)]
        for label in np.unique(y):
            members = np.flatnonzero(y == label)
            rng.shuffle(members)
            shares = rng.dirichlet(np.full(n_sites, alpha))
            cuts = (np.cumsum(shares) * len(members)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(members, cuts)):
                shards[site].extend(chunk.tolist())
        if min(len(s) for s in shards) >= min_examples:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw gave every site {min_examples} examples; "
        "raise alpha or lower min_examples_per_site"
    )


def iid_partition(n_examples: int, n_sites: int, seed: int) -> list[IntArray]:
    """Shuffle and deal indices into ``n_sites`` near-equal shards."""
    order = np.random.default_rng(seed).permutation(n_examples)
    return [np.sort(part.astype(np.int64)) for part in np.array_split(order, n_sites)]


def matching_partition(
    labels: npt.ArrayLike, reference: list[IntArray], seed: int, reference_labels: npt.ArrayLike
) -> list[IntArray]:
    """Split ``labels`` across sites in the same per-class proportions as ``reference``.

    ``reference[i]`` indexes ``reference_labels`` (e.g. site ``i``'s training examples);
    each class of ``labels`` is dealt to the sites in proportion to how many examples of
    that class each site holds there. Used to give every site a held-out set drawn from
    its own label distribution.
    """
    y = np.asarray(labels)
    ref = np.asarray(reference_labels)
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in reference]
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        weights = np.array([np.count_nonzero(ref[idx] == label) for idx in reference], float)
        if weights.sum() == 0:
            weights = np.ones(len(reference))
        cuts = np.round(np.cumsum(weights / weights.sum()) * len(members)).astype(int)[:-1]
        for site, chunk in enumerate(np.split(members, cuts)):
            shards[site].extend(chunk.tolist())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
