"""Signed updates end to end: a site that signs with a key the coordinator does not know.

Scenario (trigger → fault → expected state):
- Three sites bring their own ``.npz`` files and ``site.yaml`` (``data.source: sites``);
  signatures are required (the default). site-a and site-b get their keys from the
  embedded provisioning (registered on first use); site-c already holds a key of its own
  while the coordinator has another key registered for it.
- site-c's updates are rejected in every round as ``unknown_key`` before their payload is
  read, and recorded with the round (round table, lineage); the run completes on the
  other two sites, whose manifests carry their registered key id and a signature.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from fedround.site_workers.signing_key import write_key_file
from fedround.tasks.core import keys
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.signing import SigningKey
from fedround.tasks.object_store import LocalObjectStore
from fedround.tasks.site_keys import load_key_ring, register_key

from .helpers import run_user_federation, write_array_federation

pytestmark = pytest.mark.slow

FEDERATION = "e2e-signed"
SITES = {"site-a": 60, "site-b": 40, "site-c": 50}
GOOD = ["site-a", "site-b"]
CONTRACT = {
    "name": "signed-arrays",
    "expectations": [
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "label", "value_set": [0, 1]},
        }
    ],
}


def federation_yaml() -> str:
    sites = ", ".join(f"{{name: {s}, config: ../sites/{s}/site.yaml}}" for s in SITES)
    return textwrap.dedent(
        f"""\
        federation: {FEDERATION}
        tenant: test
        seed: 5
        rounds: 2
        data: {{kind: arrays, source: sites}}
        model: {{factory: logistic_regression, in_features: 8, out_features: 2}}
        training: {{local_epochs: 1, learning_rate: 0.5, timeout_s: 120}}
        evaluation: {{holdout: holdout.npz}}
        selection: {{min_sites: 2, deadline_s: 300}}
        contract: contract.json
        sites: [{sites}]
        """
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_array_federation(
        tmp_path_factory.mktemp("signed"),
        FEDERATION,
        SITES,
        package="fr_e2e_signed",
        modules={},
        contract=CONTRACT,
        configs={"federation.yaml": federation_yaml()},
    )
    # site-c signs with its own key; the coordinator knows another one for it
    write_key_file(
        root / "sites" / "site-c" / ".fedround-state" / "signing.key", SigningKey.generate()
    )
    store = LocalObjectStore(root / "state" / "objects")
    register_key(store, FEDERATION, "site-c", SigningKey.generate().registered())
    return root


@pytest.fixture(scope="module")
def result(federation: Path) -> dict[str, Any]:
    done = run_user_federation(federation)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.result


def test_the_wrong_key_site_is_left_out_with_the_reason_and_the_run_completes(
    result: dict[str, Any], federation: Path
) -> None:
    assert result["rounds"] == 2
    assert result["sites"]["participating"] == GOOD
    left_out = result["sites"]["left_out_in_rounds"]
    assert sorted(left_out) == ["1", "2"]
    for reasons in left_out.values():
        assert sorted(reasons) == ["site-c"]
        assert "unknown_key" in reasons["site-c"]
        assert "not registered for site site-c" in reasons["site-c"]
    assert [h["sites_accepted"] for h in result["history"]] == [2.0, 2.0]

    store = LocalObjectStore(federation / "state" / "objects")
    for site in GOOD:
        raw = store.get(keys.update_manifest_key(FEDERATION, result["run_id"], 2, site))
        manifest = UpdateManifest.from_json(raw)
        registered = [k.key_id for k in load_key_ring(store, FEDERATION, site).keys]
        assert manifest.signature and manifest.key_id in registered
    for round_ in (1, 2):  # its update is in the store, but was never used
        assert store.exists(keys.update_key(FEDERATION, result["run_id"], round_, "site-c"))


def test_each_rejected_signature_is_in_the_audit_log(
    result: dict[str, Any], federation: Path
) -> None:
    from fedround.tasks.audit import AuditLog

    store = LocalObjectStore(federation / "state" / "objects")
    audit = AuditLog(store, FEDERATION)
    rejected = [e for e in audit.entries() if e.action == "update-rejected"]
    assert [(e.details["site"], e.details["round"]) for e in rejected] == [
        ("site-c", 1),
        ("site-c", 2),
    ]
    assert all(e.details["run_id"] == result["run_id"] for e in rejected)
    assert all(e.details["check"] == "unknown_key" for e in rejected)
    assert audit.verify() == []
