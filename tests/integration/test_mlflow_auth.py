"""The ``fedround-auth`` MLflow app on a real ``mlflow server``: basic auth plus the rule that
only the promotion identity (an admin, or a user in ``FEDROUND_MLFLOW_PROMOTERS``) moves a
registered model's aliases other than ``candidate`` (mlflow_plugins/auth_app.py).

One server for the module (users ``admin``, ``coordinator``, ``promoter``); each test
registers its own model as the coordinator, the identity that creates models and so holds
MANAGE on them. The TLS test starts a second server behind uvicorn's TLS.
"""

from __future__ import annotations

import json
import secrets
import shlex
import ssl
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.server import get_app_client

from fedround.flows.services.proc import (
    HOST,
    PORTS,
    Launch,
    clean_env,
    http_ok,
    mlflow_server_command,
    spawn,
    stop_record,
)
from fedround.tasks.certificates import TLSFiles, make_certificates
from fedround.tasks.core.config import parse_federation_config
from fedround.tasks.core.models import build_model
from fedround.tasks.registry import register_candidate as register_global_model
from fedround.tasks.tracking import RunTracker

pytestmark = pytest.mark.security("control-plane-auth-tls")

PROMOTER = "promoter"
COORDINATOR = "coordinator"
ADMIN = "admin"
ALIAS_PATH = "/api/2.0/mlflow/registered-models/alias"
START_TIMEOUT_S = 180


@dataclass(frozen=True)
class AuthServer:
    """A running ``fedround-auth`` server and its users' passwords."""

    url: str
    passwords: dict[str, str]

    def auth(self, user: str) -> tuple[str, str]:
        return user, self.passwords[user]


@contextmanager
def fedround_auth_server(
    base: Path, tls: TLSFiles | None = None, default_permission: str = "READ"
) -> Iterator[AuthServer]:
    """``mlflow server --app-name fedround-auth`` on sqlite under ``base``, stopped on exit
    (its whole process group). With ``tls``, uvicorn serves HTTPS with that certificate."""
    base.mkdir(parents=True, exist_ok=True)
    admin_password = secrets.token_urlsafe(24)
    config = base / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = sqlite:///{base / 'auth.db'}\n"
        f"admin_username = {ADMIN}\n"
        f"admin_password = {admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Check each password once a minute, not on every request (PBKDF2: ~0.3 s each).
        "auth_cache_ttl_seconds = 60\n"
    )
    port = PORTS.pick()
    scheme = "https" if tls else "http"
    url = f"{scheme}://{HOST}:{port}"
    command = mlflow_server_command(
        port, base / "mlflow.db", str(base / "artifacts"), app_name="fedround-auth"
    )
    # mlflow shlex-splits --uvicorn-opts and puts them before its own options. Without a
    # graceful-shutdown limit uvicorn waits for the clients' idle keep-alive connections.
    uvicorn_opts = ["--timeout-graceful-shutdown", "2"]
    if tls:
        uvicorn_opts += ["--ssl-keyfile", str(tls.key), "--ssl-certfile", str(tls.cert)]
    command += ["--uvicorn-opts", shlex.join(uvicorn_opts)]
    env = clean_env() | {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24),
        # Spaces around names are allowed (and ignored) in the list.
        "FEDROUND_MLFLOW_PROMOTERS": f" {PROMOTER} ,someone-else",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "DO_NOT_TRACK": "true",
    }
    healthy = http_ok(f"{url}/health") if tls is None else _https_ok(f"{url}/health", tls)
    launch = Launch(
        "mlflow-auth",
        command,
        env,
        base / "mlflow.log",
        healthy,
        START_TIMEOUT_S,
        {"mlflow": port},
        cwd=base,
    )
    record, proc = spawn(launch, base / "run")  # stops the group and quotes the log on failure
    try:
        yield AuthServer(url, {ADMIN: admin_password})
    finally:
        stop_record(record)
        proc.wait(timeout=30)


def _https_ok(url: str, tls: TLSFiles) -> Callable[[], bool]:
    context = ssl.create_default_context(cafile=str(tls.ca_cert))

    def check() -> bool:
        with urllib.request.urlopen(url, timeout=3, context=context) as response:
            return bool(response.status == 200)

    return check


@contextmanager
def credentials(server: AuthServer, user: str) -> Iterator[None]:
    """MLflow clients in this block act as ``user`` (credentials through the environment)."""
    with pytest.MonkeyPatch.context() as patch:
        username, password = server.auth(user)
        patch.setenv("MLFLOW_TRACKING_USERNAME", username)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


def add_user(server: AuthServer, user: str) -> None:
    # MLflow wants passwords of 12 characters or more.
    password = secrets.token_urlsafe(18)
    with credentials(server, ADMIN):
        get_app_client("basic-auth", tracking_uri=server.url).create_user(user, password)
    server.passwords[user] = password


def grant(server: AuthServer, user: str, model: str, permission: str) -> None:
    with credentials(server, ADMIN):
        auth = get_app_client("basic-auth", tracking_uri=server.url)
        auth.grant_user_permission(user, "registered_model", model, permission)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    with fedround_auth_server(tmp_path_factory.mktemp("mlflow-auth")) as running:
        add_user(running, COORDINATOR)
        add_user(running, PROMOTER)
        yield running


@pytest.fixture
def as_user(server: AuthServer, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], MlflowClient]:
    """``as_user(name)``: a client of the server acting as ``name`` from now on in the test."""

    def switch(user: str) -> MlflowClient:
        username, password = server.auth(user)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        return MlflowClient(tracking_uri=server.url, registry_uri=server.url)

    return switch


def register_candidate(client: MlflowClient) -> str:
    """As the coordinator does each round: a new model, version 1, alias ``candidate``."""
    name = f"model-{uuid.uuid4().hex[:8]}"
    run = client.create_run(client.create_experiment(f"exp-{name}"))
    client.create_registered_model(name)
    version = client.create_model_version(
        name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias(name, "candidate", version.version)
    return name


def aliases(server: AuthServer, model: str) -> dict[str, str]:
    """The model's aliases, read as the admin (over plain HTTP: the test's identity stays)."""
    response = requests.get(
        f"{server.url}/api/2.0/mlflow/registered-models/get",
        params={"name": model},
        auth=server.auth(ADMIN),
        timeout=10,
    )
    response.raise_for_status()
    found = response.json()["registered_model"].get("aliases", [])
    return {entry["alias"]: entry["version"] for entry in found}


def assert_refused(error: pytest.ExceptionInfo[MlflowException], alias: str) -> None:
    assert isinstance(error.value, RestException)
    assert error.value.error_code == "PERMISSION_DENIED"
    assert f"alias '{alias}'" in error.value.message
    assert "fedround promote" in error.value.message


def test_anonymous_requests_are_refused(server: AuthServer) -> None:
    response = requests.get(f"{server.url}/api/2.0/mlflow/registered-models/search", timeout=10)
    assert response.status_code == 401
    anonymous_set = requests.post(
        f"{server.url}{ALIAS_PATH}",
        json={"name": "any", "alias": "production", "version": "1"},
        timeout=10,
    )
    assert anonymous_set.status_code == 401


def test_coordinator_sets_and_deletes_only_candidate(
    server: AuthServer, as_user: Callable[[str], MlflowClient]
) -> None:
    coordinator = as_user(COORDINATOR)
    model = register_candidate(coordinator)
    assert aliases(server, model) == {"candidate": "1"}

    with pytest.raises(MlflowException) as error:
        coordinator.set_registered_model_alias(model, "production", "1")
    assert_refused(error, "production")
    with pytest.raises(MlflowException) as error:
        coordinator.set_registered_model_alias(model, "champion", "1")
    assert_refused(error, "champion")
    assert aliases(server, model) == {"candidate": "1"}

    coordinator.delete_registered_model_alias(model, "candidate")
    assert aliases(server, model) == {}


def test_promoter_sets_production_and_coordinator_cannot_remove_it(
    server: AuthServer, as_user: Callable[[str], MlflowClient]
) -> None:
    model = register_candidate(as_user(COORDINATOR))
    # Listed in FEDROUND_MLFLOW_PROMOTERS but with basic auth's default READ: basic auth's own
    # check (EDIT on the model) still refuses. The rule narrows basic auth, never widens it.
    with pytest.raises(MlflowException) as error:
        as_user(PROMOTER).set_registered_model_alias(model, "production", "1")
    assert error.value.get_http_status_code() == 403
    assert aliases(server, model) == {"candidate": "1"}

    # The promotion identity needs EDIT (or MANAGE) on the model for basic auth; grant it as
    # an admin would when setting up the deployment.
    grant(server, PROMOTER, model, "MANAGE")
    as_user(PROMOTER).set_registered_model_alias(model, "production", "1")
    assert aliases(server, model) == {"candidate": "1", "production": "1"}

    with pytest.raises(MlflowException) as error:
        as_user(COORDINATOR).delete_registered_model_alias(model, "production")
    assert_refused(error, "production")
    assert aliases(server, model) == {"candidate": "1", "production": "1"}


def test_admin_moves_any_alias(server: AuthServer, as_user: Callable[[str], MlflowClient]) -> None:
    model = register_candidate(as_user(COORDINATOR))
    admin = as_user(ADMIN)
    admin.set_registered_model_alias(model, "deprecated", "1")
    admin.set_registered_model_alias(model, "production", "1")
    assert aliases(server, model) == {"candidate": "1", "deprecated": "1", "production": "1"}
    admin.delete_registered_model_alias(model, "production")
    assert aliases(server, model) == {"candidate": "1", "deprecated": "1"}


def test_raw_requests_cannot_slip_past_the_rule(
    server: AuthServer, as_user: Callable[[str], MlflowClient]
) -> None:
    """The UI's /ajax-api/ route, the alias in the query string, a JSON body sent as a JSON
    string (MLflow decodes those twice) or as text/plain: all refused to the coordinator;
    a malformed body is a 400, not a server error."""
    model = register_candidate(as_user(COORDINATOR))
    coordinator = server.auth(COORDINATOR)
    body = {"name": model, "alias": "production", "version": "1"}
    attempts = {
        "ajax-api": requests.post(
            f"{server.url}/ajax-api/2.0/mlflow/registered-models/alias",
            json=body,
            auth=coordinator,
            timeout=10,
        ),
        "double-encoded": requests.post(
            f"{server.url}{ALIAS_PATH}", json=json.dumps(body), auth=coordinator, timeout=10
        ),
        "text/plain": requests.post(
            f"{server.url}{ALIAS_PATH}",
            data=json.dumps(body),
            headers={"Content-Type": "text/plain"},
            auth=coordinator,
            timeout=10,
        ),
        "delete-query": requests.delete(
            f"{server.url}{ALIAS_PATH}",
            params={"name": model, "alias": "production"},
            auth=coordinator,
            timeout=10,
        ),
        "query-beside-candidate-body": requests.delete(
            f"{server.url}{ALIAS_PATH}",
            params={"alias": "production"},
            json={"name": model, "alias": "candidate"},
            auth=coordinator,
            timeout=10,
        ),
    }
    # Basic auth itself answers 400 to the last two: its permission check reads the model
    # name only from a JSON body it parses once. The rule refuses them too (for admins
    # neither check applies, and admins may move any alias).
    assert {how: r.status_code for how, r in attempts.items()} == {
        "ajax-api": 403,
        "delete-query": 403,
        "query-beside-candidate-body": 403,
        "double-encoded": 400,
        "text/plain": 400,
    }
    assert {r.json()["error_code"] for r in attempts.values() if r.status_code == 403} == {
        "PERMISSION_DENIED"
    }

    not_a_string = json.dumps({"name": model, "alias": 7, "version": "1"}).encode()
    for user in (COORDINATOR, ADMIN):  # basic auth checks no body of an admin's request
        for malformed in (b"{not json", b"[1, 2]", not_a_string):
            response = requests.post(
                f"{server.url}{ALIAS_PATH}",
                data=malformed,
                headers={"Content-Type": "application/json"},
                auth=server.auth(user),
                timeout=10,
            )
            assert response.status_code == 400, (user, malformed, response.text)
            if user == ADMIN or malformed == not_a_string:
                assert "malformed alias request" in response.json()["message"]
    assert aliases(server, model) == {"candidate": "1"}


def test_tls_server_trusted_through_the_deployment_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind uvicorn's TLS with a fedround CA: a client given the CA works (authenticated);
    one without it fails the TLS handshake."""
    tls = make_certificates(tmp_path / "certs", [HOST, "localhost"], days=2)
    with fedround_auth_server(tmp_path / "server", tls) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.passwords[ADMIN])
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        for trust in ("MLFLOW_TRACKING_INSECURE_TLS", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
            monkeypatch.delenv(trust, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(tls.ca_cert))
        trusted = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        trusted.create_registered_model("over-tls")
        assert trusted.get_registered_model("over-tls").name == "over-tls"

        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        untrusted = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        with pytest.raises(MlflowException, match="CERTIFICATE_VERIFY_FAILED"):
            untrusted.get_registered_model("over-tls")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{server.url}/health", timeout=10)


# --- tenants: a server whose default permission is NO_PERMISSIONS ---------------------------


@pytest.fixture(scope="module")
def tenant_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    """One coordinator user per tenant and a promoter of tenant A; nobody sees what another
    user made unless granted (``default_permission = NO_PERMISSIONS``)."""
    base = tmp_path_factory.mktemp("mlflow-tenants")
    with fedround_auth_server(base, default_permission="NO_PERMISSIONS") as running:
        for user in ("coord-clinics", "coord-banks", PROMOTER):
            add_user(running, user)
        yield running


def _tenant_run(
    client_as: Callable[[], None], url: str, federation: str, promoters: list[str]
) -> str:
    """As the tenant's coordinator does: its experiment and run, then its model as candidate
    (the real RunTracker.start and register_candidate). Returns the model's name."""
    config = parse_federation_config(
        f"federation: {federation}\ncontract: c.json\nsites: [{{name: a}}, {{name: b}}]\n"
        f"registry: {{promoters: {json.dumps(promoters)}}}\n"
    )
    client_as()
    tracker = RunTracker.start(url, config, "r1", tags={"fedround.federation": federation})
    weights = build_model(config.model, seed=0).state_dict()
    register_global_model(tracker, config, weights, {"fedround.run_id": "r1"})
    tracker.finish()
    return config.model_name


def _forbidden(call: Callable[[], object]) -> bool:
    """The server refused ``call`` with 403 (basic auth's permission check)."""
    try:
        call()
    except MlflowException as exc:
        return "403" in str(exc) or getattr(exc, "error_code", "") == "PERMISSION_DENIED"
    return False


@pytest.mark.security("tenant-isolation")
def test_tenants_see_only_their_own_experiments_and_models(
    tenant_server: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = tenant_server.url

    def as_user(user: str) -> MlflowClient:
        username, password = tenant_server.auth(user)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        return MlflowClient(tracking_uri=url, registry_uri=url)

    clinics_model = _tenant_run(
        lambda: as_user("coord-clinics"), url, "clinic-fed", promoters=[PROMOTER]
    )
    banks_model = _tenant_run(lambda: as_user("coord-banks"), url, "bank-fed", promoters=[])

    # the other tenant's coordinator: not its experiment, runs or model, not by search either
    banks = as_user("coord-banks")
    assert _forbidden(lambda: banks.get_registered_model(clinics_model))
    assert _forbidden(lambda: banks.set_registered_model_alias(clinics_model, "candidate", "1"))
    clinic_experiment = as_user(ADMIN).get_experiment_by_name("clinic-fed")
    assert clinic_experiment is not None
    banks = as_user("coord-banks")
    assert _forbidden(lambda: banks.get_experiment(clinic_experiment.experiment_id))
    assert [m.name for m in banks.search_registered_models()] == [banks_model]

    # the clinics' promoter, granted by their coordinator: reads the run, promotes the model
    promoter = as_user(PROMOTER)
    assert promoter.search_runs([clinic_experiment.experiment_id])
    promoter.set_registered_model_alias(clinics_model, "production", "1")
    assert aliases(tenant_server, clinics_model)["production"] == "1"
    # …and nothing of the banks' (their config names no promoter)
    assert _forbidden(lambda: promoter.get_registered_model(banks_model))
    assert [m.name for m in promoter.search_registered_models()] == [clinics_model]
