"""Signed update manifests: what the coordinator accepts and what it rejects, and why."""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from fedround.site_workers.settings import SiteSettings
from fedround.site_workers.signing_key import (
    SIGNING_KEY_ENV,
    ensure_signing_key,
    load_signing_key,
    provision_site_keys,
    rotate_site_key,
    write_key_file,
)
from fedround.tasks.aggregation import read_update
from fedround.tasks.core import keys
from fedround.tasks.core.errors import ConfigError, RejectReason, UpdateRejected
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.serialization import sha256_hex, weights_to_bytes
from fedround.tasks.core.signing import (
    KeyRing,
    RegisteredKey,
    SigningKey,
    sign_manifest,
    signed_bytes,
    verify_manifest,
)
from fedround.tasks.core.validation import UpdateExpectation, check_manifest, tensor_specs
from fedround.tasks.object_store import LocalObjectStore, ObjectStoreSettings
from fedround.tasks.site_keys import load_key_ring, register_key, signing_keys

pytestmark = pytest.mark.security("unsigned-updates")

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SITE_KEY = SigningKey.generate()
OTHER_KEY = SigningKey.generate()


def _manifest(**fields: object) -> UpdateManifest:
    values: dict[str, object] = {
        "federation": "fed",
        "run_id": "run-1",
        "round": 2,
        "site": "a",
        "nonce": "n-2",
        "num_examples": 10,
        "sha256": "ab" * 32,
        "nbytes": 100,
    }
    values.update(fields)
    return UpdateManifest(**values)  # type: ignore[arg-type]


def _signed(**fields: object) -> UpdateManifest:
    return sign_manifest(_manifest(**fields), SITE_KEY)


def _reason(manifest: UpdateManifest, registered: list[RegisteredKey] | None = None) -> str:
    with pytest.raises(UpdateRejected) as caught:
        verify_manifest(manifest, registered or [SITE_KEY.registered()], NOW)
    return caught.value.reason.value


def test_a_signed_manifest_verifies_and_survives_json() -> None:
    manifest = UpdateManifest.from_json(_signed().to_json())

    key = verify_manifest(manifest, [OTHER_KEY.registered(), SITE_KEY.registered()], NOW)

    assert key.key_id == SITE_KEY.key_id
    assert manifest.key_id == SITE_KEY.key_id
    assert len(base64.b64decode(manifest.signature or "")) == 64


def test_an_unsigned_manifest_is_rejected_as_unsigned() -> None:
    assert _reason(_manifest()) == RejectReason.UNSIGNED


def test_a_manifest_signed_with_an_unregistered_key_is_rejected() -> None:
    assert _reason(sign_manifest(_manifest(), OTHER_KEY)) == RejectReason.UNKNOWN_KEY


def test_a_forged_signature_under_the_sites_key_id_is_rejected() -> None:
    forged = sign_manifest(_manifest(), OTHER_KEY).model_copy(update={"key_id": SITE_KEY.key_id})

    assert _reason(forged) == RejectReason.FORGED


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_examples", 10_000),
        ("sha256", "cd" * 32),  # a tampered payload needs a new digest: it breaks the signature
        ("nbytes", 101),
        ("site", "b"),
        ("encoding", "q8"),
        ("attempt", 2),
    ],
)
def test_a_tampered_signed_field_is_rejected_as_forged(field: str, value: object) -> None:
    tampered = _signed().model_copy(update={field: value})

    assert _reason(tampered) == RejectReason.FORGED


def test_a_manifest_rewritten_for_another_round_or_run_is_forged() -> None:
    assert _reason(_signed(round=1).model_copy(update={"round": 2})) == RejectReason.FORGED
    assert _reason(_signed(run_id="old").model_copy(update={"run_id": "run-1"})) == "forged"
    assert _reason(_signed(nonce="n-1").model_copy(update={"nonce": "n-2"})) == "forged"


def test_a_genuine_manifest_replayed_from_an_earlier_round_or_run_is_stale() -> None:
    expected = UpdateExpectation("fed", "run-1", 2, "n-2", "a", {}, 1 << 20, 100)
    earlier_round = _signed(round=1, nonce="n-1")
    other_run = _signed(run_id="run-0")
    verify_manifest(earlier_round, [SITE_KEY.registered()], NOW)  # its signature is genuine

    with pytest.raises(UpdateRejected) as round_:
        check_manifest(earlier_round, expected)
    with pytest.raises(UpdateRejected) as run:
        check_manifest(other_run, expected)

    assert round_.value.reason == RejectReason.WRONG_ROUND
    assert run.value.reason == RejectReason.WRONG_RUN


@pytest.mark.parametrize("cut", [0, 1, 63])
def test_a_truncated_signature_is_rejected(cut: int) -> None:
    manifest = _signed()
    raw = base64.b64decode(manifest.signature or "")
    truncated = manifest.model_copy(update={"signature": base64.b64encode(raw[:cut]).decode()})

    assert _reason(truncated) == RejectReason.FORGED
    assert _reason(manifest.model_copy(update={"signature": "not base64!"})) == "forged"


def test_a_rotated_key_overlaps_then_the_old_one_expires() -> None:
    old, new = SITE_KEY, OTHER_KEY
    ring = KeyRing(site="a", keys=[old.registered()]).with_key(
        new.registered(), retire_others_at=NOW + timedelta(hours=24)
    )
    by_old, by_new = sign_manifest(_manifest(), old), sign_manifest(_manifest(), new)

    during = NOW + timedelta(hours=23)
    assert verify_manifest(by_old, ring.valid(during), during).key_id == old.key_id
    assert verify_manifest(by_new, ring.valid(during), during).key_id == new.key_id
    after = NOW + timedelta(hours=25)
    with pytest.raises(UpdateRejected) as expired:
        verify_manifest(by_old, ring.keys, after)
    assert expired.value.reason == RejectReason.UNKNOWN_KEY
    assert "retired" in str(expired.value)
    assert verify_manifest(by_new, ring.keys, after).key_id == new.key_id


def test_signed_bytes_are_canonical_and_skip_unsigned_fields() -> None:
    manifest = _signed()

    later = manifest.model_copy(update={"metrics": {"loss": 1.0}, "created_at": NOW})

    assert signed_bytes(manifest) == signed_bytes(later)
    verify_manifest(later, [SITE_KEY.registered()], NOW)


@pytest.mark.security("secrets-in-logs")
def test_key_text_round_trips_and_hides_in_repr() -> None:
    again = SigningKey.from_text(SITE_KEY.private_text())

    assert again.key_id == SITE_KEY.key_id
    assert SITE_KEY.private_text() not in repr(again)
    assert RegisteredKey.from_text(SITE_KEY.public_key).key_id == SITE_KEY.key_id
    with pytest.raises(ConfigError):
        SigningKey.from_text("short")
    with pytest.raises(ConfigError):
        RegisteredKey.from_text(base64.b64encode(b"x" * 31).decode())


# --- site side: where the private key comes from -------------------------------------


def _settings(tmp_path: Path, **fields: object) -> SiteSettings:
    store = ObjectStoreSettings(kind="local", root=tmp_path / "objects")
    return SiteSettings(site="a", federation="fed", data_dir=tmp_path, object_store=store, **fields)  # type: ignore[arg-type]


def test_a_site_key_file_must_be_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    settings = _settings(tmp_path)
    assert load_signing_key(settings) is None  # none yet: updates go unsigned

    key = ensure_signing_key(settings)

    path = settings.signing_key_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signing_key(settings).key_id == key.key_id  # type: ignore[union-attr]
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_signing_key(settings)


def test_the_environment_key_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path, signing_key_file=tmp_path / "missing.key")
    monkeypatch.setenv(SIGNING_KEY_ENV, OTHER_KEY.private_text())

    assert load_signing_key(settings).key_id == OTHER_KEY.key_id  # type: ignore[union-attr]
    monkeypatch.delenv(SIGNING_KEY_ENV)
    with pytest.raises(ConfigError, match="does not exist"):
        load_signing_key(settings)


def test_rotation_registers_the_new_key_and_keeps_the_old_one_for_the_overlap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    settings = _settings(tmp_path)
    store = LocalObjectStore(tmp_path / "objects")
    first = ensure_signing_key(settings)
    register_key(store, "fed", "a", first.registered())

    new, old = rotate_site_key(settings, store, timedelta(hours=1))

    assert old is not None and old.key_id == first.key_id
    assert load_signing_key(settings).key_id == new.key_id  # type: ignore[union-attr]
    ring = load_key_ring(store, "fed", "a")
    assert [k.key_id for k in ring.keys] == [first.key_id, new.key_id]
    assert ring.keys[0].not_after is not None and ring.keys[1].not_after is None
    in_two_hours = datetime.now(UTC) + timedelta(hours=2)
    assert [k.key_id for k in ring.valid(in_two_hours)] == [new.key_id]
    assert os.environ.get(SIGNING_KEY_ENV) is None


# --- coordinator side: verified before the payload is read ---------------------------


def test_read_update_rejects_a_wrong_key_before_reading_the_payload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    store = LocalObjectStore(tmp_path / "objects")
    settings = _settings(tmp_path)
    site_yaml = tmp_path / "site.yaml"
    from fedround.site_workers.settings import write_site_settings

    write_site_settings(site_yaml, settings)
    provision_site_keys({"a": site_yaml}, store, "fed")
    delta = {"w": torch.ones(2)}
    payload = weights_to_bytes(delta)
    manifest = _manifest(sha256=sha256_hex(payload), nbytes=len(payload))
    expected = UpdateExpectation(
        "fed", "run-1", 2, "n-2", "a", tensor_specs(delta), 1 << 20, 100,
        signing_keys=signing_keys(store, "fed", ["a"])["a"],
    )  # fmt: skip
    store.put(keys.update_key("fed", "run-1", 2, "a"), payload)
    manifest_key = keys.update_manifest_key("fed", "run-1", 2, "a")

    store.put(manifest_key, sign_manifest(manifest, ensure_signing_key(settings)).to_json())
    assert read_update(store, expected)[0].site == "a"

    reads: list[str] = []
    get = store.get
    monkeypatch.setattr(store, "get", lambda key, **kw: reads.append(key) or get(key, **kw))
    store.put(manifest_key, sign_manifest(manifest, OTHER_KEY).to_json())
    with pytest.raises(UpdateRejected) as caught:
        read_update(store, expected)
    assert caught.value.reason == RejectReason.UNKNOWN_KEY
    assert reads == [manifest_key]  # the payload was never read

    unchecked = replace(expected, signing_keys=None)  # limits.require_signatures: false
    store.put(manifest_key, manifest.to_json())
    assert read_update(store, unchecked)[0].signature is None


def test_provisioning_trusts_a_sites_first_key_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedround.site_workers.settings import write_site_settings

    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    store = LocalObjectStore(tmp_path / "objects")
    site_yaml = tmp_path / "site.yaml"
    settings = _settings(tmp_path)
    write_site_settings(site_yaml, settings)

    first = provision_site_keys({"a": site_yaml}, store, "fed")["a"]  # made here: registered
    assert [k.key_id for k in load_key_ring(store, "fed", "a").keys] == [first]
    assert provision_site_keys({"a": site_yaml}, store, "fed")["a"] == first  # idempotent

    write_key_file(settings.signing_key_path, OTHER_KEY)  # the site swaps in a key of its own
    assert provision_site_keys({"a": site_yaml}, store, "fed")["a"] == OTHER_KEY.key_id
    assert [k.key_id for k in load_key_ring(store, "fed", "a").keys] == [first]  # not trusted


# --- fedround keys ----------------------------------------------------------------------


def test_cli_rotates_registers_and_lists_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fedround.flows.cli.main import app
    from fedround.site_workers.settings import write_site_settings

    saved = dict(os.environ)
    monkeypatch.delenv("FEDROUND_OBJECT_STORE", raising=False)
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    monkeypatch.setenv("FEDROUND_STATE_DIR", str(tmp_path / "state"))
    store = LocalObjectStore(tmp_path / "state" / "objects")
    site_yaml = tmp_path / "site.yaml"
    write_site_settings(site_yaml, _settings(tmp_path))
    first = provision_site_keys({"a": site_yaml}, store, "fed")["a"]
    try:
        runner = CliRunner()
        rotated = runner.invoke(
            app, ["keys", "rotate", "--site", "a", "--site-config", str(site_yaml)]
        )
        register = ["keys", "register", "--federation", "fed", "--site", "b"]
        registered = runner.invoke(app, [*register, "--public-key", OTHER_KEY.public_key])
        listed = runner.invoke(app, ["keys", "list", "--federation", "fed"])
        bad = runner.invoke(app, ["keys", "rotate", "--site", "a", "--overlap", "soon"])
    finally:
        os.environ.clear()
        os.environ.update(saved)

    assert rotated.exit_code == 0, rotated.output
    new = load_signing_key(_settings(tmp_path))
    assert new is not None and new.key_id != first
    assert f"old key {first} stays valid until" in rotated.output
    assert new.private_text() not in rotated.output + listed.output
    assert registered.exit_code == 0 and OTHER_KEY.key_id in registered.output
    assert listed.exit_code == 0
    assert f"{first}  valid until" in listed.output and f"{new.key_id}  valid  " in listed.output
    assert "b:" in listed.output and OTHER_KEY.key_id in listed.output
    assert bad.exit_code == 2


def test_site_init_writes_a_0600_key_beside_the_config_and_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from fedround.site_workers.data import save_site_data
    from fedround.site_workers.onboarding import init_site

    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    save_site_data(tmp_path / "train.npz", np.zeros((4, 2), np.float32), np.zeros(4, np.int64))
    store = ObjectStoreSettings(kind="local", root=tmp_path / "objects")
    out = tmp_path / "conf" / "site.yaml"

    def init() -> tuple[str, str]:
        done = init_site(
            federation="fed", site="a", train=tmp_path / "train.npz", out=out, store=store,
            force=True,
        )  # fmt: skip
        return done.key_id, done.public_key

    key_id, public = init()

    path = tmp_path / "conf" / "site.signing.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert RegisteredKey.from_text(public).key_id == key_id
    assert path.read_text().strip() not in out.read_text()  # the config names it, never holds it
    assert init()[0] == key_id  # re-init keeps the key


# --- revocation, concurrent registration and the audit log -----------------------------


def test_a_revoked_key_is_rejected_and_never_registered_again(tmp_path: Path) -> None:
    from fedround.tasks.audit import AuditLog
    from fedround.tasks.site_keys import revoke_key

    store = LocalObjectStore(tmp_path / "objects")
    register_key(store, "fed", "a", SITE_KEY.registered())

    with pytest.raises(ConfigError, match="needs a reason"):
        revoke_key(store, "fed", "a", SITE_KEY.key_id, "  ")
    with pytest.raises(ConfigError, match="has no key 'nope'"):
        revoke_key(store, "fed", "a", "nope", "lost")
    ring = revoke_key(store, "fed", "a", SITE_KEY.key_id, "laptop stolen")

    assert ring.valid(datetime.now(UTC)) == []
    assert _reason(_signed(), ring.keys) == RejectReason.UNKNOWN_KEY
    with pytest.raises(UpdateRejected, match=r"revoked at .*laptop stolen"):
        verify_manifest(_signed(), ring.keys)
    with pytest.raises(ConfigError, match="never registered again"):
        register_key(store, "fed", "a", SITE_KEY.registered(), timedelta(hours=1))
    assert load_key_ring(store, "fed", "a") == ring  # the refused registration wrote nothing
    actions = [(e.action, e.model, e.details["key_id"]) for e in AuditLog(store, "fed").entries()]
    assert actions == [
        ("key-register", "site-keys", SITE_KEY.key_id),
        ("key-revoke", "site-keys", SITE_KEY.key_id),
    ]


def test_concurrent_registrations_are_compare_and_swap_and_both_land(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = LocalObjectStore(tmp_path / "objects")
    new_keys = [SigningKey.generate() for _ in range(8)]
    writes: list[str] = []
    put = store.put
    store.put = lambda key, data: writes.append(key) or put(key, data)  # type: ignore[method-assign]

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda k: register_key(store, "fed", "a", k.registered()), new_keys))

    registered = {k.key_id for k in load_key_ring(store, "fed", "a").keys}
    assert registered == {k.key_id for k in new_keys}  # none lost to a read-modify-write race
    assert keys.site_keys_key("fed", "a") not in writes  # no blind overwrite of the ring


def test_signature_rejections_are_audited_and_other_rejections_are_not(tmp_path: Path) -> None:
    from fedround.tasks.audit import AuditLog
    from fedround.tasks.site_keys import audit_signature_rejections

    store = LocalObjectStore(tmp_path / "objects")
    rejected = {
        "a": "forged: the signature does not match the manifest",
        "b": "unknown_key: signed with key 'abc'",
        "c": "nan: the update holds NaN",
        "d": "unreadable: connection reset",
        "e": "unsigned: the update of site e is not signed",
    }

    written = audit_signature_rejections(store, "fed", "fed-global", "run-1", 3, rejected)

    entries = AuditLog(store, "fed").entries()
    assert written == 3
    assert [(e.action, e.model, e.details["site"], e.details["check"]) for e in entries] == [
        ("update-rejected", "fed-global", "a", "forged"),
        ("update-rejected", "fed-global", "b", "unknown_key"),
        ("update-rejected", "fed-global", "e", "unsigned"),
    ]
    assert all(e.details["run_id"] == "run-1" and e.details["round"] == 3 for e in entries)
    assert AuditLog(store, "fed").verify() == []


def test_cli_revokes_a_key_and_lists_it_as_revoked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fedround.flows.cli.main import app

    monkeypatch.delenv("FEDROUND_OBJECT_STORE", raising=False)
    monkeypatch.setenv("FEDROUND_STATE_DIR", str(tmp_path / "state"))
    store = LocalObjectStore(tmp_path / "state" / "objects")
    register_key(store, "fed", "a", SITE_KEY.registered())
    runner = CliRunner()
    revoke = ["keys", "revoke", "--federation", "fed", "--site", "a"]

    no_reason = runner.invoke(app, [*revoke, "--key-id", SITE_KEY.key_id])
    unknown = runner.invoke(app, [*revoke, "--key-id", "feedface", "--reason", "lost"])
    done = runner.invoke(app, [*revoke, "--key-id", SITE_KEY.key_id, "--reason", "lost"])
    listed = runner.invoke(app, ["keys", "list", "--federation", "fed"])

    assert no_reason.exit_code == 2  # --reason is required
    assert unknown.exit_code == 1 and "has no key 'feedface'" in unknown.output
    assert done.exit_code == 0, done.output
    assert "no valid key left" in done.output
    assert f"{SITE_KEY.key_id}  REVOKED at" in listed.output and "lost" in listed.output


def test_cli_exports_every_sites_public_keys_for_pinning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fedround.flows.cli.main import app
    from fedround.tasks.core.signing import PeerKeys

    monkeypatch.delenv("FEDROUND_OBJECT_STORE", raising=False)
    monkeypatch.setenv("FEDROUND_STATE_DIR", str(tmp_path / "state"))
    runner = CliRunner()
    out = tmp_path / "peers.json"
    export = ["keys", "export", "--federation", "fed", "--out", str(out)]

    empty = runner.invoke(app, export)
    store = LocalObjectStore(tmp_path / "state" / "objects")
    register_key(store, "fed", "a", SITE_KEY.registered())
    register_key(store, "fed", "b", OTHER_KEY.registered())
    done = runner.invoke(app, export)

    assert empty.exit_code == 1 and "no site keys registered for fed" in empty.output
    assert done.exit_code == 0, done.output
    peers = PeerKeys.from_json(out.read_bytes())
    assert peers.federation == "fed"
    assert {site: [k.key_id for k in ring.keys] for site, ring in peers.rings.items()} == {
        "a": [SITE_KEY.key_id],
        "b": [OTHER_KEY.key_id],
    }
    assert "PRIVATE" not in out.read_text() and SITE_KEY.private_text() not in out.read_text()
