"""Per-site storage quotas on the update prefix: the measurement (local store), the verdict,
and the coordinator's check that leaves an over-quota site out with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fedround.tasks.core import keys
from fedround.tasks.core.config import LimitsConfig
from fedround.tasks.core.errors import ObjectStoreError
from fedround.tasks.core.quota import PrefixUsage, quota_breach
from fedround.tasks.object_store import LocalObjectStore
from fedround.tasks.site_storage import site_over_quota, sites_over_quota

pytestmark = pytest.mark.security("storage-growth")

PREFIX = "fed/updates/site-a/"


def test_usage_within_both_limits_is_no_breach() -> None:
    assert quota_breach(PrefixUsage(1000, 10), 1000, 10, PREFIX) is None


def test_bytes_over_the_quota_name_the_prefix_the_figures_the_setting_and_the_fix() -> None:
    why = quota_breach(PrefixUsage(3 * 1024**2, 4), 2 * 1024**2, 100, PREFIX)
    assert why is not None
    assert why.startswith(f"storage quota: its prefix {PREFIX} holds 3.0 MiB (3,145,728 bytes)")
    assert "over the quota of 2.0 MiB (limits.site_storage_bytes)" in why
    assert "mc rm --recursive" in why and "raises the quota" in why


def test_objects_over_the_quota_say_at_least_when_counting_stopped() -> None:
    why = quota_breach(PrefixUsage(10, 11, complete=False), 10**9, 10, PREFIX)
    assert why is not None
    assert "holds at least 11 objects, over the quota of 10 (limits.site_storage_objects)" in why


def test_quota_settings_must_be_positive() -> None:
    assert LimitsConfig().site_storage_bytes == 8 * 1024**3
    with pytest.raises(ValidationError, match="site_storage_bytes"):
        LimitsConfig(site_storage_bytes=0)
    with pytest.raises(ValidationError, match="site_storage_objects"):
        LimitsConfig(site_storage_objects=0)


def _fill(store: LocalObjectStore, prefix: str, sizes: list[int]) -> None:
    for i, size in enumerate(sizes):
        store.put(f"{prefix}run-{i % 2}/round-{i:04d}/blob.bin", b"x" * size)


def test_local_usage_counts_the_prefix_only_and_every_file_in_it(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    _fill(store, PREFIX, [100, 200, 300])
    _fill(store, "fed/updates/site-ab/", [5000])  # a sibling whose name starts the same
    (tmp_path / PREFIX / "run-0" / ".half-written.tmp").write_bytes(b"y" * 7)
    assert store.usage(PREFIX) == PrefixUsage(607, 4)
    assert store.usage("fed/updates/") == PrefixUsage(5607, 5)
    assert store.usage("fed/updates/nobody/") == PrefixUsage(0, 0)
    assert store.usage("fed/updates/site-a") == PrefixUsage(5607, 5)  # a partial name: both


def test_local_usage_stops_counting_past_the_object_cap(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    _fill(store, PREFIX, [1] * 50)
    capped = store.usage(PREFIX, max_objects=5)
    assert capped.objects == 6 and not capped.complete
    assert store.usage(PREFIX, max_objects=50) == PrefixUsage(50, 50)


def test_only_the_sites_over_their_quota_are_left_out(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    limits = LimitsConfig(site_storage_bytes=1000, site_storage_objects=20)
    _fill(store, keys.site_write_prefix("fed", "site-a"), [400, 400])  # 800: within
    _fill(store, keys.site_write_prefix("fed", "site-b"), [600, 600])  # 1,200: over
    _fill(store, keys.site_write_prefix("fed", "site-c"), [1] * 25)  # 25 objects: over
    found = sites_over_quota(store, "fed", ["site-a", "site-b", "site-c", "site-d"], limits)
    assert sorted(found) == ["site-b", "site-c"]
    assert "fed/updates/site-b/ holds 1.2 KiB (1,200 bytes)" in found["site-b"]
    assert "at least 21 objects" in found["site-c"]
    assert sites_over_quota(store, "fed", [], limits) == {}


class _Unlistable(LocalObjectStore):
    """Fault injection: a store whose listing fails (an outage cannot be caused otherwise
    in a unit test)."""

    def usage(self, prefix: str, max_objects: int | None = None) -> PrefixUsage:
        raise ObjectStoreError("connection refused")


def test_a_store_that_cannot_list_does_not_leave_the_site_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limits = LimitsConfig(site_storage_bytes=1)
    assert site_over_quota(_Unlistable(tmp_path), "fed", "site-a", limits) is None
    assert "could not measure the storage of site site-a" in caplog.text
