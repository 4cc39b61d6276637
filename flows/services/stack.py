"""Supervisor of the local service stack: S3 (``weed mini``), MLflow and Prefect servers.

One way to run real services for pilots (``fedround up`` / ``down`` / ``status``) and
tests (``tests/services.py``). Everything binds to 127.0.0.1; all state lives under
``<state_dir>/services/``::

    endpoints.json      ports, URLs and bucket names (no secrets)
    credentials.json    admin and per-site S3 keys, database passwords (0600, never commit)
    identities.json     weed's access-key file, derived from credentials.json (0600)
    run/<name>.json     one record per running process (pid, start time, ports)
    logs/<name>.log     each service's output
    s3/  mlflow.db  prefect/  postgres/     the services' data

Services:

* ``s3`` — ``weed mini`` with an ``admin`` identity and, per federation and site, an
  identity that may read/list only ``<bucket>/<federation>/global/*`` and write only
  ``<bucket>/<federation>/updates/<site>/*``. Buckets: ``fedround`` (versioning on) and
  ``mlflow`` (artifacts). New site identities reach a running server (SIGHUP reload).
* ``mlflow`` — ``mlflow server`` on sqlite, artifacts proxied to ``s3://mlflow/artifacts``.
* ``prefect`` — ``prefect server start`` on a private Postgres cluster (``postgres``, see
  :mod:`fedround.flows.services.postgres`) or on sqlite (``prefect_db="sqlite"``; several
  workers then risk "database is locked").

Typical use::

    stack = ServiceStack(Path(".fedround"))
    endpoints = stack.start(federations={"mnist-demo": ["site-a", "site-b"]})
    os.environ.update(endpoints.env())      # coordinator: Prefect, MLflow, S3 (admin)
    access, secret = endpoints.site_keys("mnist-demo", "site-a")
    stack.stop()
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from fedround.flows.environment import TELEMETRY_OFF
from fedround.flows.services import postgres as pg
from fedround.flows.services import s3
from fedround.flows.services.proc import (
    HOST,
    PORTS,
    Launch,
    PortRace,
    ProcessRecord,
    ServiceError,
    clean_env,
    drop_record,
    http_ok,
    mlflow_server_command,
    port_is_free,
    read_record,
    require_free,
    spawn,
    stop_record,
    tool,
    write_record,
)
from fedround.flows.services.s3 import REGION, S3Keys, SiteCredentials

__all__ = [
    "Endpoints",
    "Ports",
    "ServiceError",
    "ServiceStack",
    "ServiceStatus",
    "SiteCredentials",
    "add_site_identities",
    "down",
    "env",
    "load_endpoints",
    "status",
    "up",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

ServiceName = Literal["s3", "mlflow", "prefect"]
PrefectDb = Literal["auto", "sqlite", "postgres"]
ALL_SERVICES: tuple[ServiceName, ...] = ("s3", "mlflow", "prefect")
# Start order; stop runs the phases in reverse (each phase's services in parallel).
STOP_PHASES: tuple[tuple[str, ...], ...] = (("prefect", "mlflow"), ("postgres", "s3"))
TIMEOUTS_S: dict[str, float] = {"s3": 60, "postgres": 90, "mlflow": 180, "prefect": 240}
PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class Ports:
    """Ports asked for explicitly; ``None`` means: reuse the last one if free, else pick."""

    s3: int | None = None
    mlflow: int | None = None
    prefect: int | None = None
    postgres: int | None = None


@dataclass(frozen=True)
class ServiceStatus:
    """One line of ``fedround status``."""

    name: str
    running: bool
    healthy: bool
    url: str | None
    pid: int | None
    startup_s: float | None
    detail: str = ""


@dataclass(frozen=True)
class Endpoints:
    """Where the running services answer, and the admin S3 keys. Stable API for tests.

    Properties of a service that is not part of this stack raise :class:`ServiceError`.
    """

    state_dir: Path
    s3_bucket: str
    mlflow_bucket: str
    admin_access_key: str
    admin_secret_key: str = field(repr=False)
    s3_port: int | None = None
    mlflow_port: int | None = None
    prefect_port: int | None = None
    prefect_db: str | None = None
    s3_region: str = REGION

    def _need(self, port: int | None, service: str) -> int:
        if port is None:
            raise ServiceError(
                f"{service} is not running in the stack at {self.state_dir}: start it "
                f"(`fedround up`, or the {service}_service / local_services test fixture)"
            )
        return port

    @property
    def s3_endpoint(self) -> str:
        """``127.0.0.1:<port>`` (MinIO SDK style, no scheme)."""
        return f"{HOST}:{self._need(self.s3_port, 's3')}"

    @property
    def s3_url(self) -> str:
        return f"http://{self.s3_endpoint}"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"http://{HOST}:{self._need(self.mlflow_port, 'mlflow')}"

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{HOST}:{self._need(self.prefect_port, 'prefect')}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_ui_url}/api"

    @property
    def admin_keys(self) -> S3Keys:
        return S3Keys(self.admin_access_key, self.admin_secret_key)

    def site_credentials(self, federation: str, site: str) -> SiteCredentials:
        """A site's S3 credentials, creating its identity (on the running server) if new."""
        return add_site_identities(self.state_dir, federation, [site])[site]

    def site_keys(self, federation: str, site: str) -> tuple[str, str]:
        """``(access_key, secret_key)`` of a site, creating its identity if needed."""
        keys = self.site_credentials(federation, site).keys
        return keys.access_key, keys.secret_key

    def env(self) -> dict[str, str]:
        """The coordinator's client environment (S3 with the admin keys), telemetry off."""
        values = dict(TELEMETRY_OFF)
        if self.prefect_port is not None:
            values["PREFECT_API_URL"] = self.prefect_api_url
        if self.mlflow_port is not None:
            values["MLFLOW_TRACKING_URI"] = self.mlflow_tracking_uri
        if self.s3_port is not None:
            values |= {
                "FEDROUND_OBJECT_STORE": "s3",
                "FEDROUND_S3_ENDPOINT": self.s3_endpoint,
                "FEDROUND_S3_BUCKET": self.s3_bucket,
                "FEDROUND_S3_REGION": self.s3_region,
                "FEDROUND_S3_ACCESS_KEY": self.admin_access_key,
                "FEDROUND_S3_SECRET_KEY": self.admin_secret_key,
            }
        return values

    def tenant_env(self, tenant: str, federation: str) -> dict[str, str]:
        """Like :meth:`env`, but with the tenant coordinator's S3 keys (its own federations
        and ledgers only) instead of the admin's; ``federation`` is granted to the tenant."""
        return self._env_with(add_tenant_identity(self.state_dir, tenant, federation))

    def site_env(self, federation: str, site: str) -> dict[str, str]:
        """Like :meth:`env`, but with the site's own S3 keys instead of the admin's."""
        return self._env_with(self.site_credentials(federation, site).keys)

    def _env_with(self, keys: S3Keys) -> dict[str, str]:
        """:meth:`env` with ``keys`` in place of the admin's S3 keys."""
        values = self.env()
        values |= {
            "FEDROUND_S3_ACCESS_KEY": keys.access_key,
            "FEDROUND_S3_SECRET_KEY": keys.secret_key,
        }
        return values


def export_lines(values: Mapping[str, str], hide: Iterable[str] = ()) -> list[str]:
    """``export NAME=value`` lines; names in ``hide`` are left out."""
    hidden = set(hide)
    return [f"export {k}={shlex.quote(v)}" for k, v in values.items() if k not in hidden]


# --- the stack ---------------------------------------------------------------------------


class ServiceStack:
    """Start, stop and inspect the services of one state folder.

    ``ui`` turns the Prefect UI on (``fedround up``) or off (tests). ``durable=False``
    runs Postgres without fsync: for throw-away test clusters only.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        bucket: str = s3.DEFAULT_BUCKET,
        mlflow_bucket: str = s3.MLFLOW_BUCKET,
        ui: bool = True,
        durable: bool = True,
        timeouts_s: Mapping[str, float] | None = None,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.dir = self.state_dir / "services"
        self.run_dir = self.dir / "run"
        self.bucket = bucket
        self.mlflow_bucket = mlflow_bucket
        self.ui = ui
        self.durable = durable
        self.timeouts_s = {**TIMEOUTS_S, **(timeouts_s or {})}
        self.timings: dict[str, float] = {}
        self._children: list[Any] = []  # Popen handles of processes this object started
        self._lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------

    def start(
        self,
        services: Iterable[ServiceName] = ALL_SERVICES,
        *,
        ports: Ports | None = None,
        prefect_db: PrefectDb = "auto",
        federations: Mapping[str, Sequence[str]] | None = None,
    ) -> Endpoints:
        """Start what is not running yet (MLflow implies S3); return when all are healthy.

        Two chains run in parallel: S3 → MLflow (MLflow is given the S3 port) and
        Postgres → Prefect. On failure, whatever this call started is stopped again and
        :class:`ServiceError` quotes the failing service's log.
        """
        wanted = set(services)
        unknown = wanted - set(ALL_SERVICES)
        if unknown:
            raise ServiceError(f"unknown services {sorted(unknown)}; known: {ALL_SERVICES}")
        if "mlflow" in wanted:
            wanted.add("s3")
        ports = ports or Ports()
        with self._stack_lock():
            self._check_explicit_ports(wanted, ports)
            self._prepare(federations or {})
            db = self._resolve_db(prefect_db) if "prefect" in wanted else None
            # MLflow is told the S3 port, so it starts once S3 answers (about 1.5 s).
            chains: list[list[str]] = [[n for n in ("s3", "mlflow") if n in wanted]]
            if "prefect" in wanted:
                chains.append(["postgres", "prefect"] if db == "postgres" else ["prefect"])
            started: list[str] = []

            def run_chain(chain: list[str]) -> None:
                for name in chain:
                    if self._running(name):
                        continue
                    self._start_one(name, ports, db)
                    with self._lock:
                        started.append(name)

            with ThreadPoolExecutor(max_workers=max(len(chains), 1)) as pool:
                futures = [pool.submit(run_chain, chain) for chain in chains]
                errors = [e for f in futures if (e := f.exception()) is not None]
            if errors:
                self._stop_names(started)
                raise errors[0]
            return self.endpoints()

    def stop(self, *, purge: bool = False) -> list[str]:
        """Stop every service of this state folder (stale records too); returns those stopped.

        ``purge`` also deletes the services' data (logs and credentials stay).
        """
        with self._stack_lock():
            stopped = self._stop_names(["prefect", "mlflow", "postgres", "s3"])
            if purge:
                self._purge()
            return stopped

    def status(self) -> list[ServiceStatus]:
        """Which services run, where, and whether they answer their health check."""
        saved = self._saved()
        rows = []
        for name in ("s3", "mlflow", "postgres", "prefect"):
            record = read_record(self.run_dir, name)
            running = record is not None and record.alive()
            url = self._url(name, record, saved)
            healthy = running and self._probe(name, record)
            detail = ""
            if record is not None and not running:
                detail = "stale record (process gone): `fedround down` cleans it up"
            elif name == "prefect" and running:
                detail = f"database: {saved.get('prefect_db', '?')}"
            rows.append(
                ServiceStatus(
                    name,
                    running,
                    healthy,
                    url,
                    record.pid if record else None,
                    record.startup_s if record else None,
                    detail,
                )
            )
        return rows

    def endpoints(self) -> Endpoints:
        """Endpoints of the services running now."""
        saved = self._saved()
        creds = s3.read_credentials(self.dir)
        admin = s3.admin_keys(creds)

        def port(name: str) -> int | None:
            record = read_record(self.run_dir, name)
            return record.ports.get(name) if record and record.alive() else None

        prefect_port = port("prefect")
        return Endpoints(
            state_dir=self.state_dir,
            s3_bucket=saved.get("bucket", self.bucket),
            mlflow_bucket=saved.get("mlflow_bucket", self.mlflow_bucket),
            admin_access_key=admin.access_key,
            admin_secret_key=admin.secret_key,
            s3_port=port("s3"),
            mlflow_port=port("mlflow"),
            prefect_port=prefect_port,
            prefect_db=saved.get("prefect_db") if prefect_port else None,
        )

    def add_site_identities(
        self, federation: str, sites: Sequence[str]
    ) -> dict[str, SiteCredentials]:
        """Keys for each site (created if new); a running S3 server reloads them at once."""
        bucket = self._saved().get("bucket", self.bucket)
        keys, reloaded = self._update_identities(
            bucket,
            lambda creds: s3.ensure_site_keys(creds, federation, sites),
            lambda keys: next(iter(keys.values())),
        )
        s3_port = self._saved().get("weed_ports", {}).get("s3")
        endpoint = reloaded or (f"{HOST}:{s3_port}" if s3_port else "")
        return {
            site: SiteCredentials(federation, site, endpoint, bucket, REGION, site_keys)
            for site, site_keys in keys.items()
        }

    def add_tenant_identity(self, tenant: str, federation: str) -> S3Keys:
        """The tenant coordinator's keys, granted ``federation`` (created if new); a running
        S3 server reloads them at once."""
        bucket = self._saved().get("bucket", self.bucket)
        keys, _ = self._update_identities(
            bucket, lambda creds: s3.ensure_tenant_keys(creds, tenant, federation), lambda k: k
        )
        return keys

    def _update_identities(
        self,
        bucket: str,
        ensure: Callable[[dict[str, Any]], tuple[T, bool]],
        probe: Callable[[T], S3Keys],
    ) -> tuple[T, str | None]:
        """Run ``ensure`` on the credentials under their lock and rewrite the identity file
        when it added anything (or the file is missing); a running S3 server then reloads
        it, until ``probe(result)`` is accepted. Returns the result, and the running
        server's endpoint when it reloaded."""
        with s3.locked_credentials(self.dir) as creds:
            result, added = ensure(creds)
            if added or not s3.identities_path(self.dir).exists():
                s3.write_identities(self.dir, creds, bucket)
        record = read_record(self.run_dir, "s3")
        if not (added and record is not None and record.alive()):
            return result, None
        endpoint = f"{HOST}:{record.ports['s3']}"
        s3.reload_identities(record.pid, endpoint, bucket, probe(result))
        return result, endpoint

    # -- start helpers --------------------------------------------------------------------

    @contextlib.contextmanager
    def _stack_lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / ".stack.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _check_explicit_ports(self, wanted: Collection[str], ports: Ports) -> None:
        """Fail before starting anything when a port asked for is taken."""
        for name in ("s3", "mlflow", "prefect"):
            port = getattr(ports, name)
            if name in wanted and port is not None and not self._running(name):
                require_free(port, name, f"pass another --{name}-port")

    def _prepare(self, federations: Mapping[str, Sequence[str]]) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self._save(bucket=self.bucket, mlflow_bucket=self.mlflow_bucket)
        with s3.locked_credentials(self.dir) as creds:
            s3.write_identities(self.dir, creds, self.bucket)
        for federation, sites in federations.items():
            self.add_site_identities(federation, sites)

    def _resolve_db(self, choice: PrefectDb) -> str:
        if choice == "sqlite":
            return "sqlite"
        if pg.available():
            return "postgres"
        if choice == "postgres":
            raise ServiceError(f"Postgres is not installed: {pg.INSTALL_HINT}")
        logger.warning(
            "Postgres is not installed: the Prefect server uses sqlite, which reports "
            "'database is locked' under several workers (%s)",
            pg.INSTALL_HINT,
        )
        return "sqlite"

    def _running(self, name: str) -> bool:
        record = read_record(self.run_dir, name)
        return record is not None and record.alive()

    def _start_one(self, name: str, ports: Ports, db: str | None) -> None:
        explicit = getattr(ports, name)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                started = time.monotonic()
                self._launch(name, explicit, db)
                self.timings[name] = round(time.monotonic() - started, 2)
                return
            except PortRace:
                if explicit is not None or attempt == PORT_ATTEMPTS:
                    raise
                logger.warning("%s lost a port race; retrying with other ports", name)

    def _choose(self, name: str, explicit: int | None, hint: str) -> int:
        if explicit is not None:
            require_free(explicit, name, hint)
            return explicit
        previous = self._saved().get("ports", {}).get(name)
        if isinstance(previous, int) and port_is_free(previous):
            return PORTS.reserve(previous)
        return PORTS.pick()

    def _launch(self, name: str, explicit: int | None, db: str | None) -> None:
        if name == "s3":
            self._launch_s3(explicit)
        elif name == "postgres":
            self._launch_postgres(explicit)
        elif name == "mlflow":
            port = self._choose("mlflow", explicit, "pass another --mlflow-port")
            self._spawn(self._mlflow_launch(port))
        elif name == "prefect":
            port = self._choose("prefect", explicit, "pass another --prefect-port")
            self._spawn(self._prefect_launch(port, db or "sqlite"))
            self._save(prefect_db=db)

    def _spawn(self, launch: Launch) -> ProcessRecord:
        record, proc = spawn(launch, self.run_dir)
        self._children.append(proc)
        self._save_port(launch.name, record.ports[launch.name])
        return record

    def _launch_s3(self, explicit: int | None) -> None:
        if explicit is not None:
            require_free(explicit, "s3", "pass another --s3-port")
        previous = self._saved().get("weed_ports")
        if (
            explicit is None
            and isinstance(previous, dict)
            and all(port_is_free(p) and port_is_free(p + 10000) for p in previous.values())
        ):
            ports = {str(k): int(v) for k, v in previous.items()}
        else:
            ports = s3.weed_ports(PORTS, explicit)
        admin = s3.admin_keys(s3.read_credentials(self.dir))
        self._spawn(s3.weed_launch(self.dir, ports, admin, self.timeouts_s["s3"]))
        self._save(weed_ports=ports)
        endpoint = f"{HOST}:{ports['s3']}"
        s3.create_buckets(endpoint, admin, self.bucket, self.mlflow_bucket)

    def _launch_postgres(self, explicit: int | None) -> None:
        port = self._choose("postgres", explicit, "pass another --postgres-port")
        creds = self._db_passwords()
        cluster = pg.cluster_for(self.dir)
        if not pg.initialized(cluster):
            pg.init(cluster, self.dir, creds["superuser_password"])
        log_link = self.dir / "logs" / "postgres.log"
        if not log_link.is_symlink():
            log_link.unlink(missing_ok=True)
            log_link.symlink_to(cluster.log)
        record = pg.start(cluster, port, self.durable, self.timeouts_s["postgres"])
        write_record(self.run_dir, record)
        pg.ensure_database(port, creds["superuser_password"], creds["prefect_password"])
        self._save_port("postgres", port)

    def _db_passwords(self) -> dict[str, str]:
        import secrets

        with s3.locked_credentials(self.dir) as creds:
            db = creds.setdefault("postgres", {})
            db.setdefault("superuser_password", secrets.token_urlsafe(24))
            db.setdefault("prefect_password", secrets.token_urlsafe(24))
            return dict(db)

    def _mlflow_launch(self, port: int) -> Launch:
        s3_record = read_record(self.run_dir, "s3")
        if s3_record is None:
            raise ServiceError("MLflow needs the S3 server, which is not running")
        admin = s3.admin_keys(s3.read_credentials(self.dir))
        environment = clean_env() | {
            "MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{s3_record.ports['s3']}",
            "AWS_ACCESS_KEY_ID": admin.access_key,
            "AWS_SECRET_ACCESS_KEY": admin.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "DO_NOT_TRACK": "true",
        }
        command = mlflow_server_command(
            port, self.dir / "mlflow.db", f"s3://{self.mlflow_bucket}/artifacts"
        )
        return Launch(
            "mlflow",
            command,
            environment,
            self.dir / "logs" / "mlflow.log",
            http_ok(f"http://{HOST}:{port}/health"),
            self.timeouts_s["mlflow"],
            {"mlflow": port},
            cwd=self.dir,
        )

    def _prefect_launch(self, port: int, db: str) -> Launch:
        home = self.dir / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        if db == "postgres":
            record = read_record(self.run_dir, "postgres")
            if record is None:
                raise ServiceError("the Prefect server needs Postgres, which is not running")
            url = pg.connection_url(
                record.ports["postgres"], self._db_passwords()["prefect_password"]
            )
        else:
            url = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
        ui = "true" if self.ui else "false"
        environment = clean_env() | {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_UI_ENABLED": ui,
            "PREFECT_SERVER_UI_ENABLED": ui,
        }
        command = [
            tool("prefect"),
            "--no-prompt",
            "server",
            "start",
            "--host",
            HOST,
            "--port",
            str(port),
            "--analytics-off",
            "--ui" if self.ui else "--no-ui",
        ]
        return Launch(
            "prefect",
            command,
            environment,
            self.dir / "logs" / "prefect.log",
            http_ok(f"http://{HOST}:{port}/api/health"),
            self.timeouts_s["prefect"],
            {"prefect": port},
            cwd=self.dir,
        )

    # -- stop helpers ---------------------------------------------------------------------

    def _stop_names(self, names: Iterable[str]) -> list[str]:
        chosen = set(names)
        stopped: list[str] = []
        for phase in STOP_PHASES:
            todo = [n for n in phase if n in chosen]
            with ThreadPoolExecutor(max_workers=max(len(todo), 1)) as pool:
                results = list(pool.map(self._stop_one, todo))
            stopped += [n for n, did in zip(todo, results, strict=True) if did]
        for proc in self._children:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        self._children = [p for p in self._children if p.poll() is None]
        return stopped

    def _stop_one(self, name: str) -> bool:
        record = read_record(self.run_dir, name)
        if name == "postgres":
            return self._stop_postgres(record)
        if record is None:
            return False
        did = stop_record(record)
        drop_record(self.run_dir, name)
        if did:
            logger.info("stopped %s (pid %d)", name, record.pid)
        return did

    def _stop_postgres(self, record: ProcessRecord | None) -> bool:
        if record is None:
            # No record, but a cluster may still run (bookkeeping lost): ask pg_ctl.
            link = self.dir / "postgres"
            if not (link.exists() or link.is_symlink()) or not pg.available():
                return False
            cluster = pg.cluster_for(self.dir)
            pid = pg.postmaster_pid(cluster)
            if pid is None:
                return False
            import psutil

            try:
                record = ProcessRecord.of(
                    "postgres",
                    pid,
                    extra={"data_dir": str(cluster.data_dir), "bindir": str(cluster.bindir)},
                )
            except psutil.Error:
                return False
        alive = record.alive()
        pg.stop(record)
        drop_record(self.run_dir, "postgres")
        if alive:
            logger.info("stopped postgres (pid %d)", record.pid)
        return alive

    def _purge(self) -> None:
        pg.remove_data(self.dir)
        for path in (self.dir / "s3", self.dir / "prefect"):
            shutil.rmtree(path, ignore_errors=True)
        (self.dir / "mlflow.db").unlink(missing_ok=True)

    # -- saved endpoints ------------------------------------------------------------------

    def _saved(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.dir / "endpoints.json").read_text())
            return data
        except (OSError, ValueError):
            return {}

    def _save(self, **values: Any) -> None:
        with self._lock:
            data = self._saved() | values
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / ".endpoints.json.tmp"
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, self.dir / "endpoints.json")

    def _save_port(self, name: str, port: int) -> None:
        self._save(ports=self._saved().get("ports", {}) | {name: port})

    def _url(self, name: str, record: ProcessRecord | None, saved: dict[str, Any]) -> str | None:
        ports = record.ports if record else saved.get("ports", {})
        port = ports.get(name)
        if port is None:
            return None
        return {
            "s3": f"http://{HOST}:{port}",
            "mlflow": f"http://{HOST}:{port}",
            "prefect": f"http://{HOST}:{port}",
            "postgres": f"postgresql://{HOST}:{port}/{pg.DB_NAME}",
        }[name]

    def _probe(self, name: str, record: ProcessRecord | None) -> bool:
        if record is None:
            return False
        port = record.ports.get(name)
        checks: dict[str, Callable[[], bool]] = {
            "mlflow": http_ok(f"http://{HOST}:{port}/health"),
            "prefect": http_ok(f"http://{HOST}:{port}/api/health"),
            "s3": lambda: s3._answers(
                f"{HOST}:{port}", s3.admin_keys(s3.read_credentials(self.dir))
            ),
            "postgres": lambda: not port_is_free(int(port or 0)),
        }
        try:
            return bool(checks[name]())
        except Exception:
            return False


# --- helpers -----------------------------------------------------------------------------


# --- module-level conveniences (the CLI uses these) -------------------------------------


def up(
    state_dir: Path,
    *,
    federations: Mapping[str, Sequence[str]] | None = None,
    prefect_db: PrefectDb = "auto",
    ports: Ports | None = None,
    ui: bool = True,
) -> Endpoints:
    """Start S3, MLflow and Prefect (with site identities for ``federations``)."""
    stack = ServiceStack(state_dir, ui=ui)
    return stack.start(ports=ports, prefect_db=prefect_db, federations=federations)


def down(state_dir: Path, *, purge: bool = False) -> list[str]:
    """Stop what ``up`` started (stale pid files included)."""
    return ServiceStack(state_dir).stop(purge=purge)


def status(state_dir: Path) -> list[ServiceStatus]:
    return ServiceStack(state_dir).status()


def load_endpoints(state_dir: Path) -> Endpoints:
    """Endpoints of the services running under ``state_dir`` (from another process)."""
    return ServiceStack(state_dir).endpoints()


def env(state_dir: Path) -> dict[str, str]:
    """The coordinator's client environment for the services under ``state_dir``."""
    return load_endpoints(state_dir).env()


def add_tenant_identity(state_dir: Path, tenant: str, federation: str) -> S3Keys:
    """Create (or return) the tenant coordinator's S3 identity, granted ``federation``."""
    return ServiceStack(state_dir).add_tenant_identity(tenant, federation)


def add_site_identities(
    state_dir: Path, federation: str, sites: Sequence[str]
) -> dict[str, SiteCredentials]:
    """Create (or return) each site's S3 identity; works on a running server."""
    return ServiceStack(state_dir).add_site_identities(federation, sites)
