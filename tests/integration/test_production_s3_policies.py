"""The production S3 policies (deployments/minio/policies/*.json), enforced by a real policy
engine rather than compared as strings.

MinIO is not installable here; SeaweedFS's S3 gateway (the project's ``weed``) evaluates
AWS IAM policy documents attached to an identity. Its ``-s3.config`` file takes managed
policies (``"policies": [{"name", "content"}]``) and identities that carry no legacy
``actions`` but ``"policyNames"``; such an identity is authorized by evaluating its attached
policies only (Allow needed, explicit Deny wins), with the ``s3:prefix`` condition of
ListBucket taken from the request. The documents are rendered by the ``render`` function of
deployments/minio/init.sh itself (run in ``sh``, as the s3-init job runs it) and attached under
the names init.sh gives them, so the Statements enforced here are the production ones, byte
for byte, and no Principal or other change is made.

Each refusal of the tables below is checked twice: the identity gets AccessDenied, and the
same request made with the admin key succeeds, so no assertion can hold because the request
itself fails; a control identity holding the site policy without its s3:prefix Condition
lists what the production policy refuses to list.

Three identities of a deployment: a site (site.json), the coordinator of one tenant
(coordinator.json: its federation and its ledgers ``_tenants/<tenant>/``, nothing of another
federation, another tenant or the MLflow bucket) and the MLflow server (mlflow.json: its
artifact proxy's ``mlflow/artifacts/``, driven here by MLflow's own S3 artifact repository).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from minio import Minio
from minio.error import S3Error
from minio.versioningconfig import ENABLED, VersioningConfig

from fedround.flows.services.proc import PORTS, spawn, stop_record
from fedround.flows.services.s3 import (
    S3Keys,
    identities_path,
    new_keys,
    weed_launch,
    weed_ports,
)
from fedround.tasks.core import keys
from fedround.tasks.object_store import ObjectStoreError, S3ObjectStore

pytestmark = pytest.mark.security("site-credential-scope")

MINIO = Path(__file__).resolve().parents[2] / "deployments" / "minio"
BUCKET, MLFLOW_BUCKET, OTHER_BUCKET = "fedround", "mlflow", "other"
FEDERATION, OTHER_FEDERATION = "fed1", "fed2"
TENANT, OTHER_TENANT = "clinics", "banks"
# What the MLflow server's --artifacts-destination names (deployments/compose.yaml, k8s).
ARTIFACTS = f"s3://{MLFLOW_BUCKET}/artifacts"
SITES = ("site-a", "site-b")
RUN = "run-1"
# The site-a policy with its ListBucket Condition removed: the control that shows the
# s3:prefix condition, not a blanket refusal of ListBucket, is what refuses other listings.
UNCONDITIONED = "control-site-a-without-prefix-condition"


def _render(policy: str, site: str, out: Path) -> str:
    """``policy`` rendered by init.sh's own ``render`` function (sed), with init.sh's
    variables: BUCKET, MLFLOW_BUCKET, TENANT, FEDERATION; POLICIES is the repository's
    folder."""
    script = (MINIO / "init.sh").read_text()
    found = re.search(r"^render\(\) \{.*?^\}$", script, re.M | re.S)
    assert found, "deployments/minio/init.sh has no render() function"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "POLICIES": str(MINIO / "policies"),
        "BUCKET": BUCKET,
        "MLFLOW_BUCKET": MLFLOW_BUCKET,
        "TENANT": TENANT,
        "FEDERATION": FEDERATION,
    }
    command = f'set -eu\n{found.group(0)}\nrender "$1" "$2" "$3"\n'
    subprocess.run(["sh", "-c", command, "sh", policy, site, str(out)], env=env, check=True)
    text = out.read_text()
    assert "@" not in text, f"placeholder left in rendered {policy}: {text}"
    return text


def _without_prefix_condition(site_policy: str) -> str:
    document = json.loads(site_policy)
    for statement in document["Statement"]:
        if statement["Sid"] == "FedroundSiteListGlobal":
            statement.pop("Condition", None)
    return json.dumps(document)


@dataclass
class Stack:
    endpoint: str
    keys: dict[str, S3Keys]

    def client(self, who: str) -> Minio:
        pair = self.keys[who]
        return Minio(
            self.endpoint,
            access_key=pair.access_key,
            secret_key=pair.secret_key,
            secure=False,
            region="us-east-1",
        )


def _policy_name(site: str) -> str:
    return f"fedround-site-{FEDERATION}-{site}"  # as init.sh names it


COORDINATOR_POLICY = f"fedround-coordinator-{TENANT}"  # as init.sh names them
MLFLOW_POLICY = "fedround-mlflow"


def test_init_sh_names_the_policies_as_attached_here() -> None:
    script = (MINIO / "init.sh").read_text()
    assert 'user "fedround-coordinator-$TENANT" "$(secret coordinator_s3_access_key)"' in script
    assert 'render coordinator.json "" "$work/coordinator.json"' in script
    assert f'user {MLFLOW_POLICY} "$(secret mlflow_s3_access_key)"' in script
    assert 'render mlflow.json "" "$work/mlflow.json"' in script
    assert 'user "fedround-site-$FEDERATION-$site"' in script


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("production-s3-policies")
    rendered = root / "rendered"
    rendered.mkdir()
    policies = {
        COORDINATOR_POLICY: _render("coordinator.json", "", rendered / "coord.json"),
        MLFLOW_POLICY: _render("mlflow.json", "", rendered / "mlflow.json"),
    }
    for site in SITES:
        policies[_policy_name(site)] = _render("site.json", site, rendered / f"{site}.json")
    policies[UNCONDITIONED] = _without_prefix_condition(policies[_policy_name("site-a")])
    attached = {
        "coordinator": COORDINATOR_POLICY,
        "mlflow": MLFLOW_POLICY,
        **{site: _policy_name(site) for site in SITES},
        "unconditioned": UNCONDITIONED,
    }
    pairs = {"admin": new_keys("admin-"), **{who: new_keys(f"{who}-") for who in attached}}
    document: dict[str, Any] = {
        "identities": [
            {
                "name": "admin",
                "credentials": [
                    {"accessKey": pairs["admin"].access_key, "secretKey": pairs["admin"].secret_key}
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            # No "actions": weed authorizes these by their attached policies alone.
            *(
                {
                    "name": who,
                    "credentials": [
                        {"accessKey": pairs[who].access_key, "secretKey": pairs[who].secret_key}
                    ],
                    "policyNames": [policy],
                }
                for who, policy in attached.items()
            ),
        ],
        "policies": [{"name": name, "content": text} for name, text in policies.items()],
    }
    services = root / "services"
    services.mkdir()
    identities_path(services).write_text(json.dumps(document))
    launch = weed_launch(services, weed_ports(PORTS, None), pairs["admin"], timeout_s=120)
    record, proc = spawn(launch, services / "run")
    try:
        stack = Stack(f"127.0.0.1:{launch.ports['s3']}", pairs)
        admin = stack.client("admin")
        for bucket in (BUCKET, MLFLOW_BUCKET, OTHER_BUCKET):
            admin.make_bucket(bucket)
        admin.set_bucket_versioning(BUCKET, VersioningConfig(ENABLED))  # as init.sh does
        for key in FIXTURES:
            _put(admin, BUCKET, key)
        for key in (MLFLOW_KEY, MLFLOW_ARTIFACT):
            _put(admin, MLFLOW_BUCKET, key)
        _put(admin, OTHER_BUCKET, OTHER_KEY)
        yield stack
    finally:
        stop_record(record)
        proc.wait(timeout=30)


# --- objects and requests -----------------------------------------------------------------

GLOBAL = keys.global_key(FEDERATION, RUN, 1)
GLOBAL_MANIFEST = keys.global_manifest_key(FEDERATION, RUN, 1)
CHECKPOINT = keys.checkpoint_prefix(FEDERATION, RUN, 1) + "weights.safetensors"
OTHER_GLOBAL = keys.global_key(OTHER_FEDERATION, RUN, 1)
LEDGER = keys.privacy_ledger_entry_key(TENANT, None, 1)
SITE_LEDGER = keys.privacy_ledger_entry_key(TENANT, "site-a", 1)
OTHER_LEDGER = keys.privacy_ledger_entry_key(OTHER_TENANT, None, 1)
AUDIT = keys.audit_entry_key(FEDERATION, 1)
LOOSE = "loose-object"  # in the bucket, under no federation or tenant
MLFLOW_KEY, OTHER_KEY = "1/abc/artifacts/model.pkl", "elsewhere/object"
MLFLOW_ARTIFACT = "artifacts/1/abc/artifacts/model.pkl"  # under --artifacts-destination


def _update(site: str, federation: str = FEDERATION) -> str:
    return keys.update_key(federation, RUN, 1, site)


FIXTURES = (
    GLOBAL,
    GLOBAL_MANIFEST,
    CHECKPOINT,
    AUDIT,
    OTHER_GLOBAL,
    LEDGER,
    SITE_LEDGER,
    OTHER_LEDGER,
    LOOSE,
    *(_update(s) for s in SITES),
)


def _put(client: Minio, bucket: str, key: str, data: bytes = b"x") -> None:
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def _get(client: Minio, bucket: str, key: str) -> bytes:
    response = client.get_object(bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def _list(client: Minio, bucket: str, prefix: str | None = None) -> list[str]:
    return sorted(
        str(o.object_name) for o in client.list_objects(bucket, prefix=prefix, recursive=True)
    )


def _versions(client: Minio, bucket: str, prefix: str | None = None) -> list[str]:
    found = client.list_objects(bucket, prefix=prefix, recursive=True, include_version=True)
    return sorted(str(o.object_name) for o in found)


Request = Callable[[Minio], object]


def _refused(stack: Stack, who: str, request: Request) -> None:
    """``who`` gets AccessDenied for ``request``; the admin's identical request succeeds."""
    with pytest.raises(S3Error) as refused:
        request(stack.client(who))
    assert refused.value.code == "AccessDenied", refused.value
    request(stack.client("admin"))


PART = 5 * 1024 * 1024


def _put_in_parts(client: Minio, bucket: str, key: str, data: bytes) -> None:
    client.put_object(bucket, key, io.BytesIO(data), len(data), part_size=PART)


def _uploads_in_parts(stack: Stack, who: str, bucket: str, own: str, theirs: str) -> None:
    """A multipart upload (CreateMultipartUpload, UploadPart, Complete) of ``who`` is
    allowed at ``own`` (s3:PutObject) and refused at ``theirs``."""
    data = who.encode()[:1] * (6 * 1024 * 1024)
    _put_in_parts(stack.client(who), bucket, own, data)
    assert stack.client("admin").stat_object(bucket, own).size == len(data)
    _refused(stack, who, lambda c: _put_in_parts(c, bucket, theirs, data))


def _left_alone(stack: Stack, who: str, bucket: str, key: str) -> None:
    """``who``'s refused overwrite and delete of an admin's object leave it as it was."""
    admin, client = stack.client("admin"), stack.client(who)
    _put(admin, bucket, key, b"original")
    with pytest.raises(S3Error, match="AccessDenied"):
        _put(client, bucket, key, b"forged")
    with pytest.raises(S3Error, match="AccessDenied"):
        client.remove_object(bucket, key)
    assert _get(admin, bucket, key) == b"original"


# --- a site -------------------------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
def test_a_site_reads_and_lists_the_global_prefix(stack: Stack, site: str) -> None:
    client = stack.client(site)
    prefix = keys.site_read_prefix(FEDERATION)
    listed = _list(client, BUCKET, prefix)
    assert {GLOBAL, GLOBAL_MANIFEST} <= set(listed)
    assert all(name.startswith(prefix) for name in listed), listed
    assert _get(client, BUCKET, GLOBAL) == b"x"
    assert client.stat_object(BUCKET, GLOBAL).size == 1


@pytest.mark.parametrize("site", SITES)
def test_a_site_writes_reads_and_lists_its_own_updates(stack: Stack, site: str) -> None:
    client, admin = stack.client(site), stack.client("admin")
    key = keys.update_manifest_key(FEDERATION, RUN, 2, site)
    _put(client, BUCKET, key, site.encode())
    assert _get(admin, BUCKET, key) == site.encode()
    assert _get(client, BUCKET, key) == site.encode()
    own = keys.site_write_prefix(FEDERATION, site)
    listed = _list(client, BUCKET, own)
    assert {_update(site), key} <= set(listed)
    assert all(name.startswith(own) for name in listed), listed


def test_a_site_uploads_a_large_update_in_parts(stack: Stack) -> None:
    """Under its own prefix, not under another site's."""
    own = keys.update_key(FEDERATION, RUN, 3, "site-a")
    theirs = keys.update_key(FEDERATION, RUN, 3, "site-b")
    _uploads_in_parts(stack, "site-a", BUCKET, own, theirs)


SITE_A_REFUSED: dict[str, Request] = {
    "put-other-site-update": lambda c: _put(c, BUCKET, _update("site-b")),
    "get-other-site-update": lambda c: _get(c, BUCKET, _update("site-b")),
    "stat-other-site-update": lambda c: c.stat_object(BUCKET, _update("site-b")),
    "list-other-site-prefix": lambda c: _list(
        c, BUCKET, keys.site_write_prefix(FEDERATION, "site-b")
    ),
    "list-without-prefix": lambda c: _list(c, BUCKET),
    "list-federation-prefix": lambda c: _list(c, BUCKET, f"{FEDERATION}/"),
    "list-global-prefix-without-slash": lambda c: _list(c, BUCKET, f"{FEDERATION}/global"),
    "list-versions-global-prefix": lambda c: _versions(
        c, BUCKET, keys.site_read_prefix(FEDERATION)
    ),
    "put-global-object": lambda c: _put(c, BUCKET, GLOBAL),
    "delete-global-object": lambda c: c.remove_object(
        BUCKET, keys.global_prefix(FEDERATION, RUN, 9) + "deleted"
    ),
    "delete-own-update": lambda c: c.remove_object(
        BUCKET, keys.update_manifest_key(FEDERATION, RUN, 9, "site-a")
    ),
    "get-checkpoint": lambda c: _get(c, BUCKET, CHECKPOINT),
    "get-other-federation-global": lambda c: _get(c, BUCKET, OTHER_GLOBAL),
    "list-other-federation-global": lambda c: _list(
        c, BUCKET, keys.site_read_prefix(OTHER_FEDERATION)
    ),
    "put-own-name-other-federation": lambda c: _put(c, BUCKET, _update("site-a", OTHER_FEDERATION)),
    "get-mlflow": lambda c: _get(c, MLFLOW_BUCKET, MLFLOW_KEY),
    "put-mlflow": lambda c: _put(c, MLFLOW_BUCKET, "site-a/object"),
    "list-mlflow": lambda c: _list(c, MLFLOW_BUCKET),
    "get-bucket-versioning": lambda c: c.get_bucket_versioning(BUCKET),
    "make-bucket": lambda c: c.make_bucket("site-a-bucket"),
}


@pytest.mark.parametrize("request_", SITE_A_REFUSED.values(), ids=SITE_A_REFUSED.keys())
def test_a_site_is_refused_beyond_its_prefixes(stack: Stack, request_: Request) -> None:
    _refused(stack, "site-a", request_)


def test_a_refused_write_or_delete_leaves_the_object_alone(stack: Stack) -> None:
    for who, bucket, key in (
        ("site-a", BUCKET, keys.update_manifest_key(FEDERATION, RUN, 4, "site-b")),
        ("site-a", BUCKET, keys.global_manifest_key(FEDERATION, RUN, 4)),
        ("site-a", MLFLOW_BUCKET, "site-a/kept"),
        ("coordinator", OTHER_BUCKET, "coordinator/kept"),
    ):
        _left_alone(stack, who, bucket, key)


def test_the_prefix_condition_is_what_refuses_other_listings(stack: Stack) -> None:
    """Control: the same site policy without its s3:prefix Condition lists the listings
    that the production policy refuses, so those refusals come from the Condition."""
    client = stack.client("unconditioned")
    assert GLOBAL in _list(client, BUCKET)
    theirs = keys.site_write_prefix(FEDERATION, "site-b")
    assert _update("site-b") in _list(client, BUCKET, theirs)
    production = stack.client("site-a")
    with pytest.raises(S3Error, match="AccessDenied"):
        _list(production, BUCKET, theirs)


# --- the coordinator of tenant "clinics" ----------------------------------------------------

OWN_PREFIXES = (f"{FEDERATION}/", keys.tenant_prefix(TENANT))


def _coordinator_store(stack: Stack) -> S3ObjectStore:
    """fedround's own S3 store (tasks/object_store.py) as the coordinator holds it."""
    pair = stack.keys["coordinator"]
    return S3ObjectStore(stack.endpoint, BUCKET, pair.access_key, pair.secret_key)


@pytest.mark.security("tenant-isolation")
@pytest.mark.parametrize("prefix", OWN_PREFIXES, ids=["federation", "tenant-ledgers"])
def test_the_coordinator_reads_writes_deletes_and_lists_its_tenants_prefixes(
    stack: Stack, prefix: str
) -> None:
    client = stack.client("coordinator")
    key = f"{prefix}coordinator/object-{uuid.uuid4().hex}"
    _put(client, BUCKET, key, b"written")
    _put(client, BUCKET, key, b"rewritten")  # a second version
    assert _get(client, BUCKET, key) == b"rewritten"
    assert client.stat_object(BUCKET, key).size == len(b"rewritten")
    assert key in _list(client, BUCKET, prefix)  # exactly "<federation>/", "_tenants/<t>/"
    versions = list(client.list_objects(BUCKET, prefix=key, include_version=True))
    assert len([v for v in versions if v.object_name == key]) == 2
    old = next(v for v in versions if str(v.is_latest).lower() != "true")
    response = client.get_object(BUCKET, key, version_id=old.version_id)
    try:
        assert response.read() == b"written"
    finally:
        response.close()
        response.release_conn()
    client.remove_object(BUCKET, key, version_id=old.version_id)
    client.remove_object(BUCKET, key)
    assert key not in _list(client, BUCKET, prefix)
    assert client.get_bucket_versioning(BUCKET).status == ENABLED


@pytest.mark.security("tenant-isolation")
def test_the_coordinator_reads_what_sites_write_and_its_own_federation(stack: Stack) -> None:
    client = stack.client("coordinator")
    listed = _list(client, BUCKET, f"{FEDERATION}/")
    assert {GLOBAL, GLOBAL_MANIFEST, CHECKPOINT, AUDIT, *(_update(s) for s in SITES)} <= set(listed)
    assert all(name.startswith(f"{FEDERATION}/") for name in listed), listed
    for key in (*(_update(s) for s in SITES), CHECKPOINT, GLOBAL, AUDIT):
        assert _get(client, BUCKET, key) == b"x", key
    assert _list(client, BUCKET, keys.checkpoints_prefix(FEDERATION, RUN)) == [CHECKPOINT]
    ledgers = _list(client, BUCKET, keys.tenant_prefix(TENANT))
    assert ledgers == sorted([LEDGER, SITE_LEDGER])  # not the other tenant's
    assert _update("site-a") in _versions(
        client, BUCKET, keys.site_write_prefix(FEDERATION, "site-a")
    )


@pytest.mark.security("tenant-isolation")
def test_fedrounds_own_store_works_with_the_coordinators_identity(stack: Stack) -> None:
    """What the coordinator does through tasks/object_store.py: conditional create and
    replace (locks, ledger heads), usage, size, trimming old versions (heartbeats)."""
    store = _coordinator_store(stack)
    head = keys.privacy_ledger_head_key(TENANT, None)
    assert store.create(head, b"1")
    assert not store.create(head, b"1")  # exists
    assert store.replace(head, b"2", expected=b"1")
    assert store.get(head) == b"2"
    beat = keys.session_key(FEDERATION, RUN, "site-a", 1)
    for n in range(3):
        store.put(beat, str(n).encode())
    assert store.trim_versions(beat) == 2
    assert store.trim_versions(beat) == 0
    assert store.size(beat) == 1
    assert store.usage(f"{FEDERATION}/").objects >= len(
        [k for k in FIXTURES if k.startswith(f"{FEDERATION}/")]
    )
    lock = keys.lock_key(FEDERATION, "training")
    assert store.create(lock, b"held")
    store.delete(lock)
    assert not store.exists(lock)
    with pytest.raises(ObjectStoreError, match="access denied"):
        store.list(keys.tenant_prefix(OTHER_TENANT))
    with pytest.raises(ObjectStoreError, match="access denied"):
        store.get(OTHER_GLOBAL)


@pytest.mark.security("tenant-isolation")
def test_the_coordinator_uploads_a_large_checkpoint_in_parts(stack: Stack) -> None:
    own = keys.checkpoint_prefix(FEDERATION, RUN, 7) + "weights.safetensors"
    theirs = keys.checkpoint_prefix(OTHER_FEDERATION, RUN, 7) + "weights.safetensors"
    _uploads_in_parts(stack, "coordinator", BUCKET, own, theirs)


COORDINATOR_REFUSED: dict[str, Request] = {
    # another federation (of this bucket, whoever's tenant it is)
    "get-other-federation": lambda c: _get(c, BUCKET, OTHER_GLOBAL),
    "stat-other-federation": lambda c: c.stat_object(BUCKET, OTHER_GLOBAL),
    "put-other-federation": lambda c: _put(c, BUCKET, f"{OTHER_FEDERATION}/coordinator/object"),
    "delete-other-federation": lambda c: c.remove_object(BUCKET, f"{OTHER_FEDERATION}/gone"),
    "list-other-federation": lambda c: _list(c, BUCKET, f"{OTHER_FEDERATION}/"),
    "list-versions-other-federation": lambda c: _versions(c, BUCKET, f"{OTHER_FEDERATION}/"),
    # another tenant's ledgers
    "get-other-tenant-ledger": lambda c: _get(c, BUCKET, OTHER_LEDGER),
    "put-other-tenant-ledger": lambda c: _put(
        c, BUCKET, keys.privacy_ledger_entry_key(OTHER_TENANT, None, 2)
    ),
    "delete-other-tenant-ledger": lambda c: c.remove_object(
        BUCKET, keys.privacy_ledger_entry_key(OTHER_TENANT, None, 9)
    ),
    "list-other-tenant-ledger": lambda c: _list(c, BUCKET, keys.tenant_prefix(OTHER_TENANT)),
    "list-every-tenant": lambda c: _list(c, BUCKET, "_tenants/"),
    # the bucket as a whole, or prefixes that also cover other federations
    "list-without-prefix": lambda c: _list(c, BUCKET),
    "list-versions-without-prefix": lambda c: _versions(c, BUCKET),
    "list-federation-without-slash": lambda c: _list(c, BUCKET, FEDERATION),
    "get-outside-any-federation": lambda c: _get(c, BUCKET, LOOSE),
    "put-outside-any-federation": lambda c: _put(c, BUCKET, LOOSE),
    # the MLflow bucket: MLflow's server writes artifacts with its own identity
    "get-mlflow-artifact": lambda c: _get(c, MLFLOW_BUCKET, MLFLOW_ARTIFACT),
    "get-mlflow": lambda c: _get(c, MLFLOW_BUCKET, MLFLOW_KEY),
    "put-mlflow-artifact": lambda c: _put(c, MLFLOW_BUCKET, "artifacts/coordinator/object"),
    "delete-mlflow-artifact": lambda c: c.remove_object(MLFLOW_BUCKET, "artifacts/gone"),
    "list-mlflow": lambda c: _list(c, MLFLOW_BUCKET),
    "list-mlflow-artifacts": lambda c: _list(c, MLFLOW_BUCKET, "artifacts/"),
    "get-mlflow-versioning": lambda c: c.get_bucket_versioning(MLFLOW_BUCKET),
    # any other bucket
    "get-other-bucket": lambda c: _get(c, OTHER_BUCKET, OTHER_KEY),
    "put-other-bucket": lambda c: _put(c, OTHER_BUCKET, "coordinator/object"),
    "delete-other-bucket": lambda c: c.remove_object(OTHER_BUCKET, "coordinator/gone"),
    "list-other-bucket": lambda c: _list(c, OTHER_BUCKET),
    "get-other-bucket-versioning": lambda c: c.get_bucket_versioning(OTHER_BUCKET),
    "make-bucket": lambda c: c.make_bucket("coordinator-bucket"),
}


@pytest.mark.security("tenant-isolation")
@pytest.mark.parametrize("request_", COORDINATOR_REFUSED.values(), ids=COORDINATOR_REFUSED.keys())
def test_the_coordinator_is_refused_beyond_its_tenants_prefixes(
    stack: Stack, request_: Request
) -> None:
    _refused(stack, "coordinator", request_)


@pytest.mark.security("tenant-isolation")
def test_a_refused_coordinator_leaves_other_tenants_objects_alone(stack: Stack) -> None:
    for bucket, key in (
        (BUCKET, keys.global_manifest_key(OTHER_FEDERATION, RUN, 5)),
        (BUCKET, keys.privacy_ledger_head_key(OTHER_TENANT, None)),
        (MLFLOW_BUCKET, "artifacts/1/kept/artifacts/model.pkl"),
    ):
        _left_alone(stack, "coordinator", bucket, key)


# --- the MLflow server --------------------------------------------------------------------


@pytest.fixture
def mlflow_repo(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Any:
    """MLflow's own S3 artifact repository at the server's --artifacts-destination, as the
    server's proxy uses it, with the MLflow identity's keys."""
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://{stack.endpoint}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_EXPECTED_BUCKET_OWNER"):
        monkeypatch.delenv(name, raising=False)
    pair = stack.keys["mlflow"]
    return S3ArtifactRepository(
        ARTIFACTS, access_key_id=pair.access_key, secret_access_key=pair.secret_key
    )


def test_mlflow_logs_lists_downloads_and_deletes_artifacts(
    stack: Stack, mlflow_repo: Any, tmp_path: Path
) -> None:
    run = f"7/{uuid.uuid4().hex}/artifacts"
    model = tmp_path / "upload" / "model.pkl"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    (model.parent / "nested").mkdir()
    (model.parent / "nested" / "card.md").write_text("card")
    mlflow_repo.log_artifacts(str(model.parent), run)
    admin = stack.client("admin")
    assert _get(admin, MLFLOW_BUCKET, f"artifacts/{run}/model.pkl") == b"weights"
    root = {info.path for info in mlflow_repo.list_artifacts()}  # prefix "artifacts/"
    assert "7" in root and "1" in root
    listed = {info.path: info.is_dir for info in mlflow_repo.list_artifacts(run)}
    assert listed == {f"{run}/model.pkl": False, f"{run}/nested": True}
    out = tmp_path / "download"
    out.mkdir()
    fetched = Path(mlflow_repo.download_artifacts(run, str(out)))
    assert (fetched / "model.pkl").read_bytes() == b"weights"
    assert (fetched / "nested" / "card.md").read_text() == "card"
    mlflow_repo.delete_artifacts(run)
    assert _list(admin, MLFLOW_BUCKET, f"artifacts/{run}") == []
    assert MLFLOW_ARTIFACT in _list(admin, MLFLOW_BUCKET, "artifacts/")  # others untouched


def test_mlflow_uploads_a_large_artifact_in_parts(stack: Stack) -> None:
    own = f"artifacts/7/{uuid.uuid4().hex}/artifacts/big.bin"
    _uploads_in_parts(stack, "mlflow", MLFLOW_BUCKET, own, "outside/big.bin")


MLFLOW_REFUSED: dict[str, Request] = {
    # the fedround bucket: models, updates, checkpoints, ledgers
    "get-global": lambda c: _get(c, BUCKET, GLOBAL),
    "get-checkpoint": lambda c: _get(c, BUCKET, CHECKPOINT),
    "get-tenant-ledger": lambda c: _get(c, BUCKET, LEDGER),
    "put-federation": lambda c: _put(c, BUCKET, f"{FEDERATION}/mlflow/object"),
    "delete-federation": lambda c: c.remove_object(BUCKET, f"{FEDERATION}/mlflow/gone"),
    "list-fedround": lambda c: _list(c, BUCKET),
    "list-federation": lambda c: _list(c, BUCKET, f"{FEDERATION}/"),
    "get-fedround-versioning": lambda c: c.get_bucket_versioning(BUCKET),
    # the MLflow bucket outside artifacts/
    "get-outside-artifacts": lambda c: _get(c, MLFLOW_BUCKET, MLFLOW_KEY),
    "put-outside-artifacts": lambda c: _put(c, MLFLOW_BUCKET, "1/abc/artifacts/forged.pkl"),
    "put-artifacts-sibling": lambda c: _put(c, MLFLOW_BUCKET, "artifacts-old/object"),
    "delete-outside-artifacts": lambda c: c.remove_object(MLFLOW_BUCKET, "elsewhere/gone"),
    "list-mlflow-without-prefix": lambda c: _list(c, MLFLOW_BUCKET),
    "list-outside-artifacts": lambda c: _list(c, MLFLOW_BUCKET, "1/"),
    "list-artifacts-without-slash": lambda c: _list(c, MLFLOW_BUCKET, "artifacts"),
    "list-versions-artifacts": lambda c: _versions(c, MLFLOW_BUCKET, "artifacts/"),
    # any other bucket
    "get-other-bucket": lambda c: _get(c, OTHER_BUCKET, OTHER_KEY),
    "put-other-bucket": lambda c: _put(c, OTHER_BUCKET, "mlflow/object"),
    "list-other-bucket": lambda c: _list(c, OTHER_BUCKET),
    "make-bucket": lambda c: c.make_bucket("mlflow-bucket"),
}


@pytest.mark.parametrize("request_", MLFLOW_REFUSED.values(), ids=MLFLOW_REFUSED.keys())
def test_mlflow_is_refused_beyond_its_artifacts(stack: Stack, request_: Request) -> None:
    _refused(stack, "mlflow", request_)


def test_a_refused_mlflow_server_leaves_fedrounds_objects_alone(stack: Stack) -> None:
    for bucket, key in (
        (BUCKET, keys.global_manifest_key(FEDERATION, RUN, 6)),
        (MLFLOW_BUCKET, "registry/kept"),
    ):
        _left_alone(stack, "mlflow", bucket, key)
