"""Signed dispatch: the coordinator seals each flow run it sends to a site; the site's
worker runs a run only with a valid, unused seal of its federation's coordinator. The real
worker refusing such runs against a real Prefect server is tried in
``tests/e2e/test_distributed.py``."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fedround.flows.dispatch_key import (
    DISPATCH_KEY_ENV,
    DISPATCH_KEY_FILE_ENV,
    KEEP_PUBLISHED,
    dispatch_key_path,
    load_dispatch_key,
    publish_dispatch_key,
)
from fedround.site_workers.dispatch_check import UsedSeals, check_dispatch, trusted_dispatch_keys
from fedround.site_workers.settings import SiteSettings
from fedround.tasks.core import keys
from fedround.tasks.core.dispatch_seal import (
    SEAL_PARAMETER,
    DispatchRefused,
    DispatchSeal,
    seal_parameters,
    verify_seal,
)
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.limits import DISPATCH_KEYS_MAX_BYTES
from fedround.tasks.core.signing import SigningKey
from fedround.tasks.object_store import LocalObjectStore, ObjectStoreSettings

pytestmark = pytest.mark.security("control-plane-code", "tenant-isolation")

ENTRY = "fedround.site_workers.session:site_session"
POOL = "heart-fed-site-a"
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
PARAMS = {"federation": "heart-fed", "run_id": "r1", "site": "site-a", "attempt": 1}


def sealed(key: SigningKey, **changes: Any) -> dict[str, Any]:
    """Sealed parameters as the site's worker reads them back from Prefect (JSON)."""
    made = seal_parameters(PARAMS, key, entrypoint=ENTRY, pool=POOL, now=NOW, **changes)
    return dict(json.loads(json.dumps(made)))


def verify(parameters: dict[str, Any], key: SigningKey, **changes: Any) -> DispatchSeal:
    options: dict[str, Any] = {"entrypoint": ENTRY, "pool": POOL, "keys": [key.registered()]}
    options["now"] = NOW + timedelta(seconds=5)
    return verify_seal(parameters, **(options | changes))


def test_a_sealed_run_verifies_after_a_json_round_trip() -> None:
    key = SigningKey.generate()
    parameters = sealed(key)
    seal = verify(parameters, key)
    assert seal.key_id == key.key_id and seal.pool == POOL and seal.entrypoint == ENTRY
    assert {k: v for k, v in parameters.items() if k != SEAL_PARAMETER} == PARAMS


def test_unsealed_forged_moved_and_altered_runs_are_refused() -> None:
    key, other_tenant = SigningKey.generate(), SigningKey.generate()
    with pytest.raises(DispatchRefused, match="no coordinator seal"):
        verify(dict(PARAMS), key)
    with pytest.raises(DispatchRefused, match="not a dispatch key"):
        verify(sealed(other_tenant), key)  # another tenant's coordinator sealed it
    with pytest.raises(DispatchRefused, match=r"made for .* in pool"):
        verify(sealed(key), key, pool="heart-fed-site-b")
    with pytest.raises(DispatchRefused, match="made for"):
        verify(sealed(key), key, entrypoint="fedround.site_workers.session:site_evaluation")
    for field, value in (("run_id", "r2"), ("site", "site-b"), ("attempt", 9), ("extra", 1)):
        altered = sealed(key) | {field: value}
        with pytest.raises(DispatchRefused, match="altered"):
            verify(altered, key)
    forged = sealed(key)
    forged[SEAL_PARAMETER] = forged[SEAL_PARAMETER] | {"signature": sealed(key)["dispatch"]["id"]}
    with pytest.raises(DispatchRefused, match="signature"):
        verify(forged, key)
    stretched = sealed(key)
    stretched[SEAL_PARAMETER] = stretched[SEAL_PARAMETER] | {"expires_at": "2030-01-01T00:00:00"}
    with pytest.raises(DispatchRefused, match="altered"):
        verify(stretched, key)  # the window is signed too
    for bad in ("not a seal", {"id": "x"}, {**sealed(key)["dispatch"], "more": 1}):
        with pytest.raises(DispatchRefused, match="malformed"):
            verify(dict(PARAMS) | {SEAL_PARAMETER: bad}, key)


def test_a_seal_is_valid_only_in_its_window() -> None:
    key = SigningKey.generate()
    parameters = sealed(key)
    with pytest.raises(DispatchRefused, match="expired"):
        verify(parameters, key, now=NOW + timedelta(hours=1))
    with pytest.raises(DispatchRefused, match="future"):
        verify(parameters, key, now=NOW - timedelta(hours=1))
    with pytest.raises(DispatchRefused, match="more than a day"):
        verify(sealed(key, ttl=timedelta(days=2)), key, now=NOW)
    retired = key.registered(not_after=NOW)
    with pytest.raises(DispatchRefused, match="not a dispatch key"):
        verify(parameters, key, keys=[retired])


def test_a_seal_runs_once_even_across_a_worker_restart(tmp_path: Path) -> None:
    key = SigningKey.generate()
    seal = verify(sealed(key), key)
    UsedSeals(tmp_path / "used.json").claim(seal, NOW)
    with pytest.raises(DispatchRefused, match="already used"):
        UsedSeals(tmp_path / "used.json").claim(seal, NOW)  # a new worker reads the file
    later = verify(sealed(key), key)
    UsedSeals(tmp_path / "used.json").claim(later, NOW + timedelta(days=1))
    remembered = json.loads((tmp_path / "used.json").read_text())
    assert set(remembered) == {later.id}  # expired seals are forgotten (their window refuses)


def _site(tmp_path: Path, **changes: Any) -> SiteSettings:
    return SiteSettings(
        site="site-a",
        federation="heart-fed",
        data_dir=tmp_path,
        object_store=ObjectStoreSettings(kind="local", root=tmp_path / "store"),
        **changes,
    )


def test_a_site_trusts_the_published_keys_or_only_its_pinned_ones(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    coordinator, stranger = SigningKey.generate(), SigningKey.generate()
    site = _site(tmp_path)
    with pytest.raises(DispatchRefused, match="published no dispatch keys"):
        trusted_dispatch_keys(site, store)
    publish_dispatch_key(store, "heart-fed", "clinics", coordinator)
    assert [k.key_id for k in trusted_dispatch_keys(site, store)] == [coordinator.key_id]
    pinned = _site(tmp_path, dispatch_keys=[stranger.public_key])
    assert [k.key_id for k in trusted_dispatch_keys(pinned, store)] == [stranger.key_id]

    used = UsedSeals(tmp_path / "used.json")
    check_dispatch(site, sealed(coordinator), ENTRY, used, store, now=NOW)
    with pytest.raises(DispatchRefused, match="not a dispatch key"):
        check_dispatch(pinned, sealed(coordinator), ENTRY, used, store, now=NOW)

    store.put(keys.dispatch_keys_key("heart-fed"), b"{ not json")
    with pytest.raises(DispatchRefused, match="unusable"):
        trusted_dispatch_keys(site, store)
    store.put(keys.dispatch_keys_key("heart-fed"), b" " * (DISPATCH_KEYS_MAX_BYTES + 1))
    with pytest.raises(DispatchRefused, match="unusable"):
        trusted_dispatch_keys(site, store)
    with pytest.raises(ValueError, match="not base64"):
        _site(tmp_path, dispatch_keys=["not a key!"])


def test_publishing_adds_a_key_once_keeps_a_bounded_ring_and_mends_a_bad_one(
    tmp_path: Path,
) -> None:
    store = LocalObjectStore(tmp_path)
    first = SigningKey.generate()
    publish_dispatch_key(store, "heart-fed", "clinics", first)
    stamp = store.get(keys.dispatch_keys_key("heart-fed"))
    assert publish_dispatch_key(store, "heart-fed", "clinics", first).keys[0].key_id == first.key_id
    assert store.get(keys.dispatch_keys_key("heart-fed")) == stamp  # nothing rewritten
    for _ in range(KEEP_PUBLISHED + 3):
        ring = publish_dispatch_key(store, "heart-fed", "clinics", SigningKey.generate())
    assert len(ring.keys) == KEEP_PUBLISHED and first.key_id not in {k.key_id for k in ring.keys}
    store.put(keys.dispatch_keys_key("heart-fed"), b"[]")
    mended = publish_dispatch_key(store, "heart-fed", "clinics", first)
    assert [k.key_id for k in mended.keys] == [first.key_id]


def test_the_dispatch_key_comes_from_the_environment_a_file_or_the_tenants_state(
    tmp_path: Path,
) -> None:
    made = load_dispatch_key("clinics", tmp_path, env={})
    path = dispatch_key_path(tmp_path, "clinics")
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_dispatch_key("clinics", tmp_path, env={}).key_id == made.key_id  # kept
    assert load_dispatch_key("banks", tmp_path, env={}).key_id != made.key_id  # per tenant
    given = SigningKey.generate()
    env = {DISPATCH_KEY_ENV: given.private_text()}
    assert load_dispatch_key("clinics", tmp_path, env=env).key_id == given.key_id
    assert load_dispatch_key("x", tmp_path, env={DISPATCH_KEY_FILE_ENV: str(path)}).key_id == (
        made.key_id
    )
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_dispatch_key("x", tmp_path, env={DISPATCH_KEY_FILE_ENV: str(path)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_dispatch_key("x", tmp_path, env={DISPATCH_KEY_FILE_ENV: str(tmp_path / "none")})
    with pytest.raises(ConfigError, match=DISPATCH_KEY_ENV):
        load_dispatch_key("x", tmp_path, env={DISPATCH_KEY_ENV: "garbage"})


def test_keys_dispatch_shows_the_public_key_to_pin_and_never_the_private_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fedround.flows.cli.main import app

    monkeypatch.setenv("FEDROUND_STATE_DIR", str(tmp_path))
    shown = CliRunner().invoke(app, ["keys", "dispatch", "--tenant", "clinics"])
    assert shown.exit_code == 0, shown.output
    key = load_dispatch_key("clinics", tmp_path, env={})
    assert key.key_id in shown.output and f"- {key.public_key}" in shown.output
    assert key.private_text() not in shown.output
    made = CliRunner().invoke(
        app, ["keys", "dispatch", "--tenant", "clinics", "--new-file", str(tmp_path / "k")]
    )
    assert made.exit_code == 0 and (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    again = CliRunner().invoke(
        app, ["keys", "dispatch", "--tenant", "clinics", "--new-file", str(tmp_path / "k")]
    )
    assert again.exit_code == 1 and "exists" in again.output


def test_an_unwritable_state_folder_still_refuses_a_replay_in_this_worker(tmp_path: Path) -> None:
    """Site templates may mount the data (and so the default state folder) read-only:
    the seal is then remembered by the worker process, with a warning, and the run goes on.
    (A regular file in place of the folder makes writing fail even for root.)"""
    key = SigningKey.generate()
    blocker = tmp_path / "state"
    blocker.write_text("not a folder")
    used = UsedSeals(blocker / "used.json")
    seal = verify(sealed(key), key)
    used.claim(seal, NOW)
    with pytest.raises(DispatchRefused, match="already used"):
        used.claim(seal, NOW)
    from fedround.site_workers.dispatch_check import used_seals

    site = _site(tmp_path, state_dir=tmp_path / "elsewhere")
    assert used_seals(site) is used_seals(site)  # one record per state folder per process
