"""Hostile sites end to end: a wrong signing key, and a site that floods its update prefix.

Scenario (trigger → fault → expected state):
- Four sites bring their own ``.npz`` files and ``site.yaml`` (``data.source: sites``);
  signatures are required (the default) and each site may hold 1 MiB under
  ``<federation>/updates/<site>/``. site-a, site-b and site-d get their keys from the
  embedded provisioning (registered on first use).
- site-c already holds a key of its own while the coordinator has another key registered
  for it: its updates are rejected in every round as ``unknown_key`` before their payload
  is read, recorded with the round (round table, lineage) and audited
  (``update-rejected``, one entry per round).
- site-d has written a 2 MiB object of its own under its prefix (its credential may: the
  prefix is its to write, and S3 has no per-prefix quota). The coordinator measures each
  site's prefix before it sends work: site-d is left out of every round with a reason
  naming its prefix, what it holds, the quota and the fix, and is sent nothing.
- The run completes on site-a and site-b, whose manifests carry their registered key id
  and a signature. ``mode: async`` (FedBuff versions) does the same: site-c's updates
  rejected and audited per version, site-d never sent work.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from fedround.site_workers.signing_key import write_key_file
from fedround.tasks.audit import AuditLog
from fedround.tasks.core import keys
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.signing import SigningKey
from fedround.tasks.object_store import LocalObjectStore
from fedround.tasks.site_keys import load_key_ring, register_key

from .helpers import run_user_federation, sites_yaml, write_array_federation

pytestmark = pytest.mark.slow

FEDERATION = "e2e-hostile"
SITES = {"site-a": 60, "site-b": 40, "site-c": 50, "site-d": 50}
GOOD = ["site-a", "site-b"]
CONTRACT = {
    "name": "hostile-arrays",
    "expectations": [
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "label", "value_set": [0, 1]},
        }
    ],
}
FLOOD = 2 * 1024 * 1024


def federation_yaml(extra: str = "") -> str:
    return (
        textwrap.dedent(
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
            limits: {{site_storage_bytes: 1048576}}
            contract: contract.json
            sites: {sites_yaml(SITES)}
            """
        )
        + extra
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_array_federation(
        tmp_path_factory.mktemp("hostile"),
        FEDERATION,
        SITES,
        package="fr_e2e_hostile",
        modules={},
        contract=CONTRACT,
        configs={
            "federation.yaml": federation_yaml(),
            "async.yaml": federation_yaml("mode: async\nasync: {buffer_size: 2}\n"),
        },
    )
    # site-c signs with its own key; the coordinator knows another one for it
    write_key_file(
        root / "sites" / "site-c" / ".fedround-state" / "signing.key", SigningKey.generate()
    )
    store = LocalObjectStore(root / "state" / "objects")
    register_key(store, FEDERATION, "site-c", SigningKey.generate().registered())
    # site-d fills its update prefix past its quota
    store.put(f"{keys.site_write_prefix(FEDERATION, 'site-d')}hoard/blob.bin", b"\0" * FLOOD)
    return root


@pytest.fixture(scope="module")
def result(federation: Path) -> dict[str, Any]:
    done = run_user_federation(federation)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.result


@pytest.fixture(scope="module")
def async_result(federation: Path, result: dict[str, Any]) -> dict[str, Any]:
    done = run_user_federation(federation, "async.yaml")  # after the sync run: its own run id
    assert done.returncode == 0, done.stderr[-4000:]
    return done.result


def _check_wrong_key(reason: str) -> None:
    assert "unknown_key" in reason
    assert "not registered for site site-c" in reason


def _check_over_quota(reason: str) -> None:
    assert reason.startswith(
        f"storage quota: its prefix {FEDERATION}/updates/site-d/ holds 2.0 MiB (2,097,"
    )
    assert "over the quota of 1.0 MiB (limits.site_storage_bytes)" in reason
    assert "mc rm --recursive" in reason


def _rejections(federation: Path, run_id: str) -> list[tuple[str, int, str]]:
    audit = AuditLog(LocalObjectStore(federation / "state" / "objects"), FEDERATION)
    assert audit.verify() == []
    return [
        (e.details["site"], e.details["round"], e.details["check"])
        for e in audit.entries()
        if e.action == "update-rejected" and e.details["run_id"] == run_id
    ]


@pytest.mark.security("unsigned-updates", "storage-growth")
def test_the_hostile_sites_are_left_out_with_their_reasons_and_the_run_completes(
    result: dict[str, Any], federation: Path
) -> None:
    assert result["rounds"] == 2
    assert result["sites"]["participating"] == GOOD
    left_out = result["sites"]["left_out_in_rounds"]
    assert sorted(left_out) == ["1", "2"]
    for reasons in left_out.values():
        assert sorted(reasons) == ["site-c", "site-d"]
        _check_wrong_key(reasons["site-c"])
        _check_over_quota(reasons["site-d"])
    assert [h["sites_accepted"] for h in result["history"]] == [2.0, 2.0]
    assert result["model"]["alias"] == "candidate"

    store = LocalObjectStore(federation / "state" / "objects")
    for site in GOOD:
        raw = store.get(keys.update_manifest_key(FEDERATION, result["run_id"], 2, site))
        manifest = UpdateManifest.from_json(raw)
        registered = [k.key_id for k in load_key_ring(store, FEDERATION, site).keys]
        assert manifest.signature and manifest.key_id in registered
    for round_ in (1, 2):
        # site-c's update is in the store, but was never used; site-d was sent nothing
        assert store.exists(keys.update_key(FEDERATION, result["run_id"], round_, "site-c"))
        assert not store.exists(keys.update_key(FEDERATION, result["run_id"], round_, "site-d"))


@pytest.mark.security("unsigned-updates")
def test_each_rejected_signature_is_in_the_audit_log(
    result: dict[str, Any], federation: Path
) -> None:
    assert _rejections(federation, result["run_id"]) == [
        ("site-c", 1, "unknown_key"),
        ("site-c", 2, "unknown_key"),
    ]


@pytest.mark.security("unsigned-updates", "storage-growth")
def test_async_versions_reject_and_audit_the_wrong_key_and_skip_the_flooded_site(
    async_result: dict[str, Any], federation: Path
) -> None:
    assert [h["round"] for h in async_result["history"]] == [1, 2]
    reasons = async_result["sites"]["left_out_in_rounds"]
    seen = {site for per_version in reasons.values() for site in per_version}
    assert seen == {"site-c", "site-d"}
    for per_version in reasons.values():
        if "site-c" in per_version:
            _check_wrong_key(per_version["site-c"])
        if "site-d" in per_version:
            _check_over_quota(per_version["site-d"])
    rejected = _rejections(federation, async_result["run_id"])
    assert rejected and {(site, check) for site, _, check in rejected} == {
        ("site-c", "unknown_key")
    }
    # each of site-c's trainings that reached the coordinator was audited once (its round is
    # the version it trained on + 1); two of them can be rejected while one version fills,
    # so the versions that list site-c are at most as many as the audit entries
    audited_rounds = [round_ for _, round_, _ in rejected]
    assert len(audited_rounds) == len(set(audited_rounds))
    listed = sum("site-c" in per_version for per_version in reasons.values())
    assert 1 <= listed <= len(rejected)
    store = LocalObjectStore(federation / "state" / "objects")
    run_prefix = f"{keys.site_write_prefix(FEDERATION, 'site-d')}{async_result['run_id']}/"
    # its session started and checked its data, but it was never sent a round
    written = {key.removeprefix(run_prefix) for key in store.list(run_prefix)}
    assert written <= {"contract.json", "sessions/0001.json"}, written
