"""Process plumbing for the local service stack: ports, records, start, health, stop.

Every service runs as its own process group (``start_new_session=True``), so it outlives
the command that started it and can be stopped as a whole. A small JSON *record* per
service (``<services>/run/<name>.json``) holds its pid, the pid's start time (so a stale
record never makes us signal an unrelated process that reused the pid), its ports and how
long it took to become healthy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from fedround.tasks.core.errors import FedroundError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Automatically chosen ports come from here. Weed opens a gRPC port at port + 10000 for
# each of its listeners, so bases stay below 22768: then every port we pick (and every
# gRPC companion, 30000-32767) stays below the kernel's ephemeral range (32768+), where
# outgoing connections would otherwise take ports from under us.
AUTO_PORT_RANGE = (20000, 22767)
GRPC_OFFSET = 10000
STOP_GRACE_S = 15.0
LOG_TAIL_LINES = 25


class ServiceError(FedroundError):
    """A local service could not be started, reached or stopped. The message says why."""


class PortInUse(ServiceError):
    """A port asked for explicitly is taken by another process."""


class PortRace(ServiceError):
    """A port that was free when chosen was taken before the service could bind it."""


# --- ports -------------------------------------------------------------------------------


def port_is_free(port: int, host: str = HOST) -> bool:
    """True when nothing listens on ``host:port``.

    SO_REUSEADDR, as the servers themselves use it: connections of a just-stopped server
    lingering in TIME_WAIT do not make its port look taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def require_free(port: int, what: str, hint: str) -> None:
    """Raise :class:`PortInUse` naming the service and what to do."""
    if not port_is_free(port):
        raise PortInUse(
            f"port {port} on {HOST} (wanted by {what}) is in use by another process: "
            f"stop that process or {hint}"
        )


class PortPicker:
    """Hands out distinct free ports from :data:`AUTO_PORT_RANGE` (thread-safe).

    Ports handed out once are never handed out again by the same picker, so services
    starting in parallel threads cannot pick the same port before either has bound it.
    """

    def __init__(self, taken: Iterable[int] = ()) -> None:
        self._taken: set[int] = set(taken)
        self._random = random.SystemRandom()
        self._lock = threading.Lock()

    def reserve(self, port: int) -> int:
        with self._lock:
            self._taken.add(port)
        return port

    def pick(self, with_grpc: bool = False) -> int:
        """A free port; with ``with_grpc`` also ``port + 10000`` must be free."""
        low, high = AUTO_PORT_RANGE
        with self._lock:
            for _ in range(500):
                port = self._random.randint(low, high)
                companions = [port, port + GRPC_OFFSET] if with_grpc else [port]
                if any(p in self._taken for p in companions):
                    continue
                if all(port_is_free(p) for p in companions):
                    self._taken.update(companions)
                    return port
        raise ServiceError(f"no free port found in {low}-{high} on {HOST}")


# One picker per process: every stack in this process draws from it.
PORTS = PortPicker()


# --- records -----------------------------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux), or None elsewhere.

    Unlike ``psutil.Process.create_time()`` (boot time read from the wall clock plus these
    ticks), it does not move when the system clock is adjusted: on a virtual machine the
    wall clock can be stepped by seconds during a long test session, and a service would
    then look like a different process (and be started a second time) although it runs.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class ProcessRecord:
    """What ``<services>/run/<name>.json`` holds about one running service."""

    name: str
    pid: int
    create_time: float
    ports: dict[str, int] = field(default_factory=dict)
    startup_s: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)
    start_ticks: int | None = None

    @classmethod
    def of(
        cls,
        name: str,
        pid: int,
        ports: dict[str, int] | None = None,
        startup_s: float = 0.0,
        extra: dict[str, str] | None = None,
    ) -> ProcessRecord:
        """The record of the live process ``pid`` (raises ``psutil.Error`` if it is gone)."""
        return cls(
            name,
            pid,
            psutil.Process(pid).create_time(),
            dict(ports or {}),
            startup_s,
            dict(extra or {}),
            start_ticks(pid),
        )

    def process(self) -> psutil.Process | None:
        """The live process this record describes, or None if it is gone (or pid reused)."""
        try:
            proc = psutil.Process(self.pid)
            ticks = start_ticks(self.pid) if self.start_ticks is not None else None
            if ticks is not None:
                if ticks != self.start_ticks:
                    return None
            elif abs(proc.create_time() - self.create_time) > 1.0:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None


def record_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.json"


def write_record(run_dir: Path, record: ProcessRecord) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = record_path(run_dir, record.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    os.replace(tmp, path)


def read_record(run_dir: Path, name: str) -> ProcessRecord | None:
    path = record_path(run_dir, name)
    try:
        return ProcessRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def drop_record(run_dir: Path, name: str) -> None:
    record_path(run_dir, name).unlink(missing_ok=True)


# --- logs --------------------------------------------------------------------------------


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.rstrip().splitlines()[-lines:]
    return "\n".join(f"    {line[:300]}" for line in tail) or "    (log is empty)"


# --- start -------------------------------------------------------------------------------


@dataclass
class Launch:
    """How to start one service and how to tell that it is ready."""

    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    healthy: Callable[[], bool]
    timeout_s: float
    ports: dict[str, int]
    cwd: Path | None = None


_BIND_ERRORS = ("address already in use", "is not available", "port is already in use")


def start(launch: Launch, run_dir: Path) -> tuple[ProcessRecord, subprocess.Popen[bytes]]:
    """Start ``launch`` in its own session and write its record; returns at once (see
    :func:`await_healthy`)."""
    launch.log.parent.mkdir(parents=True, exist_ok=True)
    with launch.log.open("ab") as log:
        log.write(f"\n=== fedround: starting {launch.name}: {' '.join(launch.command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            launch.command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=launch.env,
            cwd=launch.cwd,
            start_new_session=True,
        )
    record = ProcessRecord.of(launch.name, proc.pid, dict(launch.ports))
    write_record(run_dir, record)
    return record, proc


def await_healthy(
    launch: Launch,
    proc: subprocess.Popen[bytes],
    record: ProcessRecord,
    run_dir: Path,
    started: float,
) -> None:
    """Wait until a :func:`start`-ed service is healthy and record its start-up time
    (``started``: ``time.monotonic()`` before it was started). On failure the process group
    is stopped, the record dropped, and :class:`ServiceError` quotes the log."""
    try:
        wait_healthy(launch, proc)
    except BaseException:
        stop_record(record)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        drop_record(run_dir, launch.name)
        raise
    record.startup_s = round(time.monotonic() - started, 2)
    write_record(run_dir, record)
    logger.info("%s healthy after %.1fs (pid %d)", launch.name, record.startup_s, proc.pid)


def spawn(launch: Launch, run_dir: Path) -> tuple[ProcessRecord, subprocess.Popen[bytes]]:
    """Start ``launch`` in its own session, wait until healthy, write its record.

    On failure the process group is stopped and :class:`ServiceError` quotes the log.
    """
    started = time.monotonic()
    record, proc = start(launch, run_dir)
    await_healthy(launch, proc, record, run_dir, started)
    return record, proc


def tool(name: str) -> str:
    """A console script of this venv (next to its python), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"`{name}` is not installed: run scripts/bootstrap.sh")
    return found


def mlflow_server_command(
    port: int, database: Path, artifacts: str | None = None, app_name: str | None = None
) -> list[str]:
    """``mlflow server`` on 127.0.0.1:``port``, one worker, its runs in sqlite at
    ``database``; ``artifacts``: where it stores artifacts (served through it);
    ``app_name``: an MLflow app (``fedround-auth``)."""
    command = [tool("mlflow"), "server"]
    if app_name is not None:
        command += ["--app-name", app_name]
    command += ["--host", HOST, "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{database}"]
    if artifacts is not None:
        command += ["--artifacts-destination", artifacts]
    return command


def clean_env() -> dict[str, str]:
    """This process's environment without Prefect/MLflow/AWS settings meant for clients."""
    drop = ("PREFECT_", "MLFLOW_", "AWS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def http_ok(url: str) -> Callable[[], bool]:
    """A health check: ``url`` answers 200."""

    def check() -> bool:
        with urllib.request.urlopen(url, timeout=3) as response:
            return bool(response.status == 200)

    return check


def wait_healthy(launch: Launch, proc: subprocess.Popen[bytes]) -> None:
    """Poll ``launch.healthy`` until true; fail fast if the process exits."""
    deadline = time.monotonic() + launch.timeout_s
    delay = 0.1
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = log_tail(launch.log)
            error = PortRace if any(e in tail.lower() for e in _BIND_ERRORS) else ServiceError
            raise error(
                f"{launch.name} exited with code {code} before becoming healthy; "
                f"last lines of {launch.log}:\n{tail}"
            )
        with contextlib.suppress(Exception):
            if launch.healthy():
                return
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    raise ServiceError(
        f"{launch.name} was not healthy within {launch.timeout_s:.0f}s; "
        f"last lines of {launch.log}:\n{log_tail(launch.log)}"
    )


# --- stop --------------------------------------------------------------------------------


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _signal_group(proc: psutil.Process, sig: signal.Signals) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
            return
    except OSError:
        pass
    with contextlib.suppress(psutil.Error):
        proc.send_signal(sig)


def stop_record(record: ProcessRecord, grace_s: float = STOP_GRACE_S) -> bool:
    """SIGTERM the service's process group and descendants, SIGKILL what outlives ``grace_s``.

    Returns True if something was running. Stale records (process gone or pid reused)
    are a no-op.
    """
    proc = record.process()
    if proc is None:
        return False
    procs = _tree(proc)
    _signal_group(proc, signal.SIGTERM)
    for child in procs[1:]:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    if alive:
        logger.warning(
            "%s did not stop within %.0fs after SIGTERM; sending SIGKILL", record.name, grace_s
        )
        _signal_group(proc, signal.SIGKILL)
        for survivor in alive:
            with contextlib.suppress(psutil.Error):
                survivor.kill()
        _, alive = psutil.wait_procs(alive, timeout=5)
    if alive:
        raise ServiceError(
            f"{record.name}: processes {[p.pid for p in alive]} survived SIGKILL; "
            "check them with `ps` and stop them by hand"
        )
    return True
