"""Real local services for tests: S3 (``weed mini``), MLflow and Prefect on Postgres.

Loaded for every test through ``pytest_plugins`` in ``tests/conftest.py``. All fixtures are
session-scoped and share one stack under a pytest temporary folder: the first fixture that
needs a service starts it (on free ports, 127.0.0.1 only), the end of the session stops
every process and deletes the services' data (the logs stay, under
``<state_dir>/services/logs/``, for post-mortems).

Fixtures, each yielding :class:`Endpoints`:

``s3_service``       the S3 server; buckets ``fedround`` (versioned) and ``mlflow``
``mlflow_service``   the MLflow tracking server (sqlite), artifacts in S3 (starts S3 too)
``prefect_service``  the Prefect server on a private Postgres cluster (API only, no UI)
``local_services``   all three, started in parallel

``Endpoints`` (stable API, from :mod:`fedround.flows.services.stack`)::

    state_dir: Path                 the stack's state folder (services in state_dir/services)
    prefect_api_url: str            http://127.0.0.1:<port>/api
    mlflow_tracking_uri: str        http://127.0.0.1:<port>
    s3_endpoint: str                127.0.0.1:<port> (MinIO SDK style, no scheme)
    s3_bucket: str                  fedround
    s3_region: str                  us-east-1 (site clients must pass it, see below)
    admin_access_key: str           admin S3 keys (create buckets, read and write anything)
    admin_secret_key: str
    site_keys(federation, site) -> tuple[str, str]
                                    (access, secret) of a site, its identity created on
                                    the running server if new: it may read and list
                                    <bucket>/<federation>/global/* and write
                                    <bucket>/<federation>/updates/<site>/* only
    site_credentials(federation, site) -> SiteCredentials
                                    the same plus endpoint, bucket and region;
                                    .object_store_settings() is a site.yaml object_store block
    env() -> dict[str, str]         the coordinator's client environment: PREFECT_API_URL,
                                    MLFLOW_TRACKING_URI, FEDROUND_OBJECT_STORE=s3,
                                    FEDROUND_S3_{ENDPOINT,BUCKET,REGION,ACCESS_KEY,SECRET_KEY}
                                    (admin keys) and telemetry-off variables; only the
                                    variables of services this fixture started
    site_env(federation, site) -> dict[str, str]
                                    env() with the site's keys instead of the admin's

A property of a service the fixture did not start (``prefect_api_url`` of ``s3_service``)
raises ``ServiceError`` naming the fixture to use. Site credentials may not call
``GetBucketLocation``: build site clients with ``region="us-east-1"``
(``ObjectStoreSettings(region=...)``); the admin keys work either way.

Postgres is required for ``prefect_service`` (sqlite's "database is locked" shows up
under several workers): ``scripts/test.sh`` installs it via ``scripts/install_postgres.sh``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedround.flows.services.stack import ALL_SERVICES, Endpoints, ServiceStack

__all__ = [
    "Endpoints",
    "local_services",
    "mlflow_service",
    "prefect_service",
    "s3_service",
    "service_stack",
]


@pytest.fixture(scope="session")
def service_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    """The session's (initially empty) stack; stopped and purged at the end."""
    stack = ServiceStack(tmp_path_factory.mktemp("services"), ui=False, durable=False)
    try:
        yield stack
    finally:
        stack.stop(purge=True)


@pytest.fixture(scope="session")
def s3_service(service_stack: ServiceStack) -> Endpoints:
    return service_stack.start(["s3"])


@pytest.fixture(scope="session")
def mlflow_service(service_stack: ServiceStack) -> Endpoints:
    return service_stack.start(["s3", "mlflow"])


@pytest.fixture(scope="session")
def prefect_service(service_stack: ServiceStack) -> Endpoints:
    return service_stack.start(["prefect"], prefect_db="postgres")


@pytest.fixture(scope="session")
def local_services(service_stack: ServiceStack) -> Endpoints:
    return service_stack.start(ALL_SERVICES, prefect_db="postgres")
