"""Secure aggregation end to end on the embedded default, through the real CLI: the sites
train and answer the protocol's steps in local worker processes, every message goes
through the object store, signed.

Scenario: four demo sites that pinned the federation's keys (``fedround keys export``,
``peer_keys_file``), one of which (site-d) then signs with a key that is not registered
for it (its disk was restored from another machine, say). With secure
aggregation, site-d's key advert is refused before any share is dealt (the reason is in
the round table), and the other three (the threshold is 3) complete every round. No plain
update is ever written; each site's masked update is in its own prefix; the model's
lineage says how it was aggregated. (That the secure sum equals plain FedAvg is shown
against a plain run in tests/e2e/test_distributed.py and tests/unit/test_secure_round.py.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedround.tasks.core import keys
from fedround.tasks.object_store import LocalObjectStore

from .helpers import fedround, provision_demo_federation, run_ok

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FEDERATION = "e2e-secagg"
SITES = ["site-a", "site-b", "site-c", "site-d"]
CONFIG: dict[str, Any] = {
    "federation": FEDERATION,
    "seed": 9,
    "rounds": 2,
    "data": {
        "source": "mnist",
        "train_size": 1200,
        "test_size": 300,
        "split_seed": 42,
        "partition": {"kind": "iid", "min_examples_per_site": 50},
    },
    "selection": {"min_sites": 3, "deadline_s": 300},
    "training": {"batch_size": 32, "learning_rate": 0.05},
    "contract": str(REPO / "deployments/examples/contracts/mnist-site-data.json"),
    "sites": [{"name": site} for site in SITES],
}


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedround.site_workers.settings import load_site_settings
    from fedround.site_workers.signing_key import provision_site_keys, write_key_file
    from fedround.tasks.core.signing import SigningKey

    state = tmp_path_factory.mktemp("secagg-state")
    plain = state.parent / "secagg-plain.yaml"
    plain.write_text(yaml.safe_dump(CONFIG))
    provision_demo_federation(plain, state)
    configs = {site: next(state.rglob(f"{site}/site.yaml")) for site in SITES}
    store = LocalObjectStore(state / "objects")
    os.environ["FEDROUND_STATE_DIR"] = str(state)
    try:
        provision_site_keys(configs, store, FEDERATION)
    finally:
        del os.environ["FEDROUND_STATE_DIR"]
    # Every site pins the federation's keys as `fedround keys export` writes them
    peers = state / "peers.json"
    exported = fedround(
        "keys", "export", "--federation", FEDERATION, "--out", str(peers), state_dir=state
    )
    assert exported.returncode == 0, exported.stderr[-2000:]
    for path in configs.values():
        raw = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**raw, "peer_keys_file": str(peers)}))
    # site-d's key is then replaced by one that was never registered
    write_key_file(load_site_settings(configs["site-d"]).signing_key_path, SigningKey.generate())
    return state


def test_the_secure_run_sums_the_three_signed_sites_and_leaves_out_the_unregistered_one(
    state_dir: Path,
) -> None:
    path = state_dir.parent / "secagg.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "secure_aggregation": {"enabled": True}}))
    secure = run_ok(path, state_dir, "--run-id", "secure")

    left_out = secure["sites"]["left_out_in_rounds"]  # site-d, every round, saying why
    assert sorted(left_out) == ["1", "2"]
    assert all(left_out[r]["site-d"].startswith("unknown_key: ") for r in left_out)
    assert [h["secagg_sites"] for h in secure["history"]] == [3.0, 3.0]
    assert [h["secagg_threshold"] for h in secure["history"]] == [3.0, 3.0]
    assert secure["final_metrics"]["accuracy"] > 0.3  # it learns (a plain run: about 0.55)
    store = LocalObjectStore(state_dir / "objects")
    for site in ("site-a", "site-b", "site-c"):
        prefix = keys.update_prefix(FEDERATION, "secure", 1, site)
        stored = store.list(prefix)
        assert prefix + "secagg/masked.bin" in stored
        assert not [key for key in stored if key.endswith("update.safetensors")]
    # The model version says how it was aggregated; lineage prints it
    lineage = fedround(
        "lineage", f"{FEDERATION}-global", secure["model"]["version"], state_dir=state_dir
    )
    assert lineage.returncode == 0, lineage.stderr[-2000:]
    assert (
        "privacy.secure_aggregation: on: the coordinator saw only sums of a majority of each "
        "round (min_sites 3); 32-bit fixed point, value range default; rounds aborted: none"
    ) in lineage.stdout
    # site-d's advert was refused: it was never asked to deal shares
    assert not store.exists(keys.secagg_site_key(FEDERATION, "secure", 1, "site-d", "shares.json"))
