"""The embedded default's local servers: a Prefect server (with its UI) and the MLflow UI,
started in the background on the first ``fedround run`` and reused by later runs.

They serve the state folder's own stores (Prefect's sqlite database under
``<state>/prefect``, MLflow's ``<state>/mlflow.db``), so the runs of earlier commands stay
visible. A small watcher process stops both once no run has used them for an idle period
(``FEDROUND_LOCAL_IDLE_S``, default one hour); ``fedround down`` stops them at once.
Everything lives under ``<state>/local/``::

    run/<name>.json    one record per process (pid, start time, port): see proc.py
    logs/<name>.log    each server's output
    clients/<pid>      one file per command using the servers now
    last-used          touched when a command stops using them

A record whose process is gone (stale), a server that does not answer its health check,
and a port taken by a program that is not ours are each detected and reported in one line
(``notices``), then handled: the record is dropped, the server restarted, or another port
chosen.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedround.flows.environment import PREFECT_SERVER_TUNING, TELEMETRY_OFF
from fedround.flows.services.proc import (
    HOST,
    PORTS,
    Launch,
    ProcessRecord,
    ServiceError,
    await_healthy,
    clean_env,
    drop_record,
    http_ok,
    mlflow_server_command,
    port_is_free,
    read_record,
    start,
    stop_record,
    tool,
    write_record,
)

log = logging.getLogger(__name__)

IDLE_ENV = "FEDROUND_LOCAL_IDLE_S"
MLFLOW_UI_ENV = "FEDROUND_MLFLOW_UI_URL"  # where run summaries link to
SWITCH_ENV = "FEDROUND_LOCAL_SERVER"  # "0"/"off": a temporary server per run instead
DEFAULT_IDLE_S = 3600.0
PREFERRED = {"prefect": 4200, "mlflow": 5000}
NAMES = ("prefect", "mlflow")
WATCH_INTERVAL_S = 10.0
HEALTH_TIMEOUT_S = {"prefect": 240.0, "mlflow": 180.0}


def enabled() -> bool:
    """Whether ``fedround run`` keeps local servers up (default yes)."""
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in {"0", "off", "false", "no"}


def idle_seconds() -> float:
    raw = os.environ.get(IDLE_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_IDLE_S
    except ValueError:
        raise ServiceError(f"{IDLE_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise ServiceError(f"{IDLE_ENV} must be a positive, finite number of seconds")
    return value


@dataclass
class LocalEndpoints:
    prefect_port: int
    mlflow_port: int
    notices: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)  # empty: both were already up

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_ui_url}/api"

    @property
    def mlflow_ui_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"


def _server_env() -> dict[str, str]:
    return clean_env() | TELEMETRY_OFF


class LocalServers:
    """The local Prefect and MLflow UI servers of one state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()
        self.dir = self.state_dir / "local"
        self.run_dir = self.dir / "run"
        self.logs = self.dir / "logs"
        self.clients = self.dir / "clients"

    # -- start or reuse -------------------------------------------------------------------

    def ensure(self) -> tuple[LocalEndpoints, Callable[[], None]]:
        """Reuse the running servers or start them; returns their endpoints at once and a
        function that waits until the ones just started answer (call it before the first
        flow run). Also registers this process as a client until :meth:`release`."""
        for sub in (self.run_dir, self.logs, self.clients):
            sub.mkdir(parents=True, exist_ok=True)
        notices: list[str] = []
        waits: list[Callable[[], None]] = []
        ports: dict[str, int] = {}
        started: list[str] = []
        with self._lock():
            for name in NAMES:
                record = read_record(self.run_dir, name)
                if record is not None and self._usable(name, record, notices):
                    ports[name] = record.ports[name]
                    continue
                port = self._choose_port(name, notices)
                waits.append(self._waiter(self._launch(name, port)))
                ports[name] = port
                started.append(name)
            if started:
                self._start_watcher()
            (self.clients / str(os.getpid())).touch()
        endpoints = LocalEndpoints(ports["prefect"], ports["mlflow"], notices, started)

        def wait() -> None:
            for each in waits:
                each()

        return endpoints, wait

    def release(self) -> None:
        """This process no longer uses the servers (their idle clock starts now)."""
        with contextlib.suppress(OSError):
            (self.clients / str(os.getpid())).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (self.dir / "last-used").touch()

    def _usable(self, name: str, record: ProcessRecord, notices: list[str]) -> bool:
        if not record.alive():
            notices.append(
                f"the local {name} server recorded in {self.run_dir} (pid {record.pid}) is "
                "gone (stale record): starting a new one"
            )
            drop_record(self.run_dir, name)
            return False
        check = self._health(name, record.ports[name])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if check():
                    return True
            time.sleep(1)
        notices.append(
            f"the local {name} server (pid {record.pid}, port {record.ports[name]}) does not "
            "answer its health check: restarting it"
        )
        stop_record(record)
        drop_record(self.run_dir, name)
        return False

    def _choose_port(self, name: str, notices: list[str]) -> int:
        preferred = PREFERRED[name]
        if port_is_free(preferred):
            return PORTS.reserve(preferred)
        port = PORTS.pick()
        notices.append(
            f"port {preferred} is taken by a program that is not this state folder's local "
            f"{name} server; using port {port} instead"
        )
        return port

    def _health(self, name: str, port: int) -> Callable[[], bool]:
        path = "/api/health" if name == "prefect" else "/health"
        return http_ok(f"http://{HOST}:{port}{path}")

    def _launch(self, name: str, port: int) -> Launch:
        env = _server_env()
        if name == "prefect":
            home = Path(os.environ.get("PREFECT_HOME") or self.state_dir / "prefect")
            home.mkdir(parents=True, exist_ok=True)
            env |= PREFECT_SERVER_TUNING | {
                "PREFECT_HOME": str(home),
                "PREFECT_UI_ENABLED": "true",
                "PREFECT_SERVER_UI_ENABLED": "true",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                # the UI calls the API at this address (by default port 4200, which on a
                # port chosen because 4200 was taken would reach someone else's server)
                "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api",
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
                "--ui",
            ]
        else:
            command = mlflow_server_command(port, self.state_dir / "mlflow.db")
        return Launch(
            name,
            command,
            env,
            self.logs / f"{name}.log",
            self._health(name, port),
            HEALTH_TIMEOUT_S[name],
            {name: port},
            cwd=self.dir,
        )

    def _waiter(self, launch: Launch) -> Callable[[], None]:
        """Start ``launch``; the returned function waits until it is healthy."""
        started = time.monotonic()
        record, proc = start(launch, self.run_dir)
        return lambda: await_healthy(launch, proc, record, self.run_dir, started)

    def _start_watcher(self) -> None:
        record = read_record(self.run_dir, "watcher")
        if record is not None and record.alive():
            return
        with (self.logs / "watcher.log").open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedround.flows.services.local_ui", str(self.state_dir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=os.environ | {IDLE_ENV: str(idle_seconds())},
                start_new_session=True,
            )
        write_record(self.run_dir, ProcessRecord.of("watcher", proc.pid))

    # -- stop ---------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop the servers and their watcher now; returns the servers that were running."""
        stopped = []
        with self._lock():
            for name in (*NAMES, "watcher"):
                record = read_record(self.run_dir, name)
                if record is None:
                    continue
                if stop_record(record) and name != "watcher":
                    stopped.append(name)
                drop_record(self.run_dir, name)
        return stopped

    def running(self) -> dict[str, int]:
        """Servers alive now: name → port."""
        found = {}
        for name in NAMES:
            record = read_record(self.run_dir, name)
            if record is not None and record.alive():
                found[name] = record.ports[name]
        return found

    def idle_for(self) -> float | None:
        """Seconds since the last command released the servers; None while one uses them."""
        live = 0
        for entry in self.clients.glob("*") if self.clients.exists() else []:
            try:
                os.kill(int(entry.name), 0)
                live += 1
            except (ValueError, ProcessLookupError):
                entry.unlink(missing_ok=True)  # a command that died without releasing
            except PermissionError:
                live += 1
        if live:
            return None
        marker = self.dir / "last-used"
        since = marker.stat().st_mtime if marker.exists() else self.dir.stat().st_mtime
        return max(0.0, time.time() - since)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def watch(state_dir: Path, idle_s: float, interval_s: float = WATCH_INTERVAL_S) -> None:
    """Stop the local servers once unused for ``idle_s`` (or once they are gone)."""
    servers = LocalServers(state_dir)
    while True:
        time.sleep(min(interval_s, idle_s))
        if not servers.running():
            break
        idle = servers.idle_for()
        if idle is not None and idle >= idle_s:
            log.warning("local servers idle for %.0fs: stopping them", idle)
            stopped = []
            for name in NAMES:
                record = read_record(servers.run_dir, name)
                if record is not None:
                    stop_record(record)
                    drop_record(servers.run_dir, name)
                    stopped.append(name)
            log.warning("stopped %s", ", ".join(stopped))
            break
    drop_record(servers.run_dir, "watcher")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    watch(Path(sys.argv[1]), idle_seconds())
