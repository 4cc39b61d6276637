"""The local stack's per-tenant coordinator identities: what each may reach, a federation
owned by one tenant, names that could widen a grant refused. What the S3 server enforces
with them is tried in ``tests/integration/test_services.py`` and every distributed e2e run
(whose coordinator holds its tenant's keys, not the admin's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedround.flows.services import s3
from fedround.flows.services.proc import ServiceError

pytestmark = pytest.mark.security("tenant-isolation")


@pytest.fixture
def credentials(tmp_path: Path) -> Any:
    with s3.locked_credentials(tmp_path / "services") as data:
        yield data


def test_a_tenant_coordinator_is_granted_its_federations_and_ledgers_only(
    credentials: dict[str, Any],
) -> None:
    first, added = s3.ensure_tenant_keys(credentials, "clinics", "heart-fed")
    assert added and first.access_key.startswith("coord-")
    again, added = s3.ensure_tenant_keys(credentials, "clinics", "heart-fed")
    assert again == first and not added  # the same keys; nothing new to reload
    second, added = s3.ensure_tenant_keys(credentials, "clinics", "lung-fed")
    assert second == first and added  # one identity per tenant, its grants extended
    s3.ensure_tenant_keys(credentials, "banks", "fraud-fed")

    document = s3.identities_document(credentials, "fedround")
    by_name = {identity["name"]: identity for identity in document["identities"]}
    assert sorted(by_name) == ["admin", "coordinator.banks", "coordinator.clinics"]
    assert by_name["coordinator.clinics"]["actions"] == [
        f"{action}:fedround/{prefix}*"
        for prefix in ("heart-fed/", "lung-fed/", "_tenants/clinics/")
        for action in ("Read", "List", "Write")
    ]
    banks = by_name["coordinator.banks"]["actions"]
    assert not any("clinics" in a or "heart-fed" in a or "mlflow" in a for a in banks)
    assert by_name["coordinator.clinics"]["credentials"] == [
        {"accessKey": first.access_key, "secretKey": first.secret_key}
    ]


def test_a_federation_claimed_by_one_tenant_is_refused_to_another(
    credentials: dict[str, Any],
) -> None:
    s3.ensure_tenant_keys(credentials, "clinics", "heart-fed")
    with pytest.raises(ServiceError, match="'heart-fed' belongs to tenant 'clinics'"):
        s3.ensure_tenant_keys(credentials, "banks", "heart-fed")
    assert "banks" not in credentials["tenants"]  # refused before anything was made


@pytest.mark.parametrize(
    ("tenant", "federation"),
    [("*", "fed"), ("clinics", "*"), ("clinics", "fed/../other"), ("Clinics", "fed"), ("", "fed")],
)
def test_a_name_that_would_widen_a_grant_is_refused(
    credentials: dict[str, Any], tenant: str, federation: str
) -> None:
    with pytest.raises(ServiceError, match="is not a name"):
        s3.ensure_tenant_keys(credentials, tenant, federation)
    assert not credentials.get("tenants")
