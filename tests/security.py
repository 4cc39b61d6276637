"""The security scenario suite: the findings of the hardening review, and their tests.

A test that tries a finding against the real components carries
``@pytest.mark.security("<finding id>")``. At the end of a session pytest prints, for
each finding, how many of its scenarios were tried and how many were refused or survived
(:mod:`tests.conftest`); ``tests/unit/test_security_catalogue.py`` checks that every
finding marked ``refused`` or ``partial`` has scenarios and that every mark names a
finding here. ``open`` findings have no defence yet; ``note`` says what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["refused", "partial", "open"]


@dataclass(frozen=True)
class Finding:
    id: str
    summary: str
    status: Status
    note: str = ""


FINDINGS: tuple[Finding, ...] = (
    Finding(
        "control-plane-code",
        "a site creates or runs a deployment outside its own pool",
        "refused",
        "site workers run only fedround's site flows, sealed by their federation's "
        "coordinator and unused; the coordinator's worker only its training, promotion and "
        "rollback flows. Prefect's API still takes one credential for all: a site holding it "
        "can read every pool's runs and cancel or delete runs (denial of service, no code "
        "runs; no per-identity authorizing proxy)",
    ),
    Finding(
        "control-plane-auth-tls",
        "Prefect and MLflow without authentication or TLS; anyone reaching MLflow moves "
        "the production alias",
        "refused",
    ),
    Finding(
        "secrets-in-image",
        "MinIO's root password and site keys in the image; placeholder secrets accepted",
        "refused",
    ),
    Finding(
        "site-credential-scope",
        "a site's S3 credential reads or writes beyond its own prefixes",
        "refused",
    ),
    Finding(
        "self-reported-weight",
        "a site claims 10^12 rows (or inflated evaluation counts) and outweighs the others",
        "refused",
    ),
    Finding(
        "untrusted-site-objects",
        "a malformed, oversized or swapped heartbeat, report, error or update fails the run "
        "or exhausts memory",
        "refused",
    ),
    Finding(
        "unsigned-updates",
        "a forged, wrong-key, tampered, replayed or truncated update is aggregated",
        "refused",
    ),
    Finding(
        "two-coordinators",
        "two coordinators on one run id overwrite each other's checkpoints",
        "refused",
    ),
    Finding(
        "promotion-crash",
        "a promotion that dies between the alias switch and the audit entry is never repaired",
        "refused",
    ),
    Finding(
        "stale-lock",
        "a crashed holder's lock blocks an emergency rollback with no way to break it",
        "refused",
    ),
    Finding(
        "audit-unanchored",
        "deleting the audit log's last entries or rewriting it goes unnoticed; a malformed "
        "line crashes --verify",
        "refused",
    ),
    Finding(
        "prune-loses-models",
        "prune with an empty or unreachable registry, or --older-than 0s, deletes what a "
        "model or a live run needs",
        "refused",
    ),
    Finding(
        "storage-growth",
        "heartbeat versions and a site's own objects fill the bucket",
        "refused",
    ),
    Finding(
        "tenant-isolation",
        "tenant is only a label: one bucket, identity, MLflow and Prefect for all tenants",
        "refused",
        "object store: one coordinator identity per tenant (local stack and production "
        "policies), granted its own federations and ledgers only; MLflow: one coordinator "
        "user per tenant on NO_PERMISSIONS; Prefect: dispatch sealed per tenant. The Prefect "
        "server is still shared: a tenant can read or cancel another's flow runs there",
    ),
    Finding(
        "hostile-config-input",
        "non-finite floats, a run id with '/' or '..', a missing contract: a traceback or a "
        "run that waits forever",
        "refused",
    ),
    Finding(
        "secrets-in-logs",
        "credentials in logged URIs or error messages, data values in contract reports",
        "refused",
    ),
)

BY_ID = {finding.id: finding for finding in FINDINGS}
