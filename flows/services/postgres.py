"""A private Postgres cluster for the Prefect server, owned by the service supervisor.

``initdb`` into ``<services>/postgres``, listen on 127.0.0.1 only (password auth), the unix
socket inside the data folder, a role and database ``prefect``. Postgres refuses to run as
root, so as root every server-side command runs as the ``postgres`` system user
(``runuser -u postgres --``) and the data folder belongs to that user. When that user
cannot reach the state folder (pytest's temporary folders are ``0700 root``), the data
folder lives at ``$TMPDIR/fedround-pg-<hash of the state folder>`` and
``<services>/postgres`` is a symlink to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedround.flows.services.proc import HOST, ProcessRecord, ServiceError, log_tail

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with scripts/install_postgres.sh (Debian: apt-get install postgresql), "
    "or use --prefect-db sqlite"
)
DB_NAME = "prefect"
DB_USER = "prefect"
SOCKET_PATH_LIMIT = 100  # AF_UNIX paths are at most 107 bytes, ".s.PGSQL.NNNNN" included


@dataclass(frozen=True)
class PostgresCluster:
    """Where a cluster lives and how to run its server-side tools."""

    bindir: Path
    data_dir: Path
    run_as: str | None  # system user to run server commands as (None: the current user)

    @property
    def log(self) -> Path:
        return self.data_dir / "postgres.log"

    def tool(self, name: str) -> list[str]:
        command = [str(self.bindir / name)]
        return ["runuser", "-u", self.run_as, "--", *command] if self.run_as else command


def find_bindir() -> Path | None:
    """Postgres' server binaries: Debian's versioned folder, else ``initdb`` on PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def available() -> bool:
    return find_bindir() is not None


def _server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError(
            "Postgres refuses to run as root and there is no `postgres` system user: "
            + INSTALL_HINT
        ) from None
    return "postgres"


def _can_traverse(path: Path, user: str) -> bool:
    """Whether ``user`` may reach ``path``: search permission on every existing ancestor."""
    entry = pwd.getpwnam(user)
    groups = set(os.getgrouplist(user, entry.pw_gid))
    for folder in [path, *path.parents]:
        if not folder.exists():
            continue
        info = folder.stat()
        if info.st_uid == entry.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


def _fallback_dir(services_dir: Path) -> Path:
    digest = hashlib.sha256(str(services_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fedround-pg-{digest}"


def cluster_for(services_dir: Path) -> PostgresCluster:
    """Decide where this stack's cluster lives (see the module docstring)."""
    bindir = find_bindir()
    if bindir is None:
        raise ServiceError(f"Postgres is not installed: {INSTALL_HINT}")
    user = _server_user()
    link = services_dir / "postgres"
    if link.is_symlink():
        return PostgresCluster(bindir, Path(os.readlink(link)), user)
    reachable = user is None or _can_traverse(services_dir, user)
    if reachable and len(str(link / ".s.PGSQL.65535")) < SOCKET_PATH_LIMIT:
        return PostgresCluster(bindir, link, user)
    return PostgresCluster(bindir, _fallback_dir(services_dir), user)


def _prepare_data_dir(cluster: PostgresCluster, services_dir: Path) -> None:
    """Create the (empty) data folder, owned by the server user, mode 0700."""
    data = cluster.data_dir
    inside = services_dir / "postgres"
    if data != inside:
        with contextlib.suppress(FileExistsError):
            os.mkdir(data, 0o700)
        info = os.lstat(data)
        expected_uid = pwd.getpwnam(cluster.run_as).pw_uid if cluster.run_as else os.geteuid()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in {expected_uid, os.geteuid()}:
            raise ServiceError(f"{data} exists and is not a folder this stack owns; remove it")
        if not inside.is_symlink():
            inside.symlink_to(data)
    else:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
    if cluster.run_as:
        entry = pwd.getpwnam(cluster.run_as)
        os.chown(data, entry.pw_uid, entry.pw_gid)
    os.chmod(data, 0o700)


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, cwd="/", env=env, timeout=180, check=False
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-2000:]
        raise ServiceError(f"{what} failed (exit {result.returncode}): {output}")
    return result.stdout


def initialized(cluster: PostgresCluster) -> bool:
    try:
        return (cluster.data_dir / "PG_VERSION").exists()
    except PermissionError:
        return True


def init(cluster: PostgresCluster, services_dir: Path, superuser_password: str) -> None:
    """``initdb`` a fresh cluster: password auth on TCP, socket inside the data folder."""
    _prepare_data_dir(cluster, services_dir)
    fd, pwfile = tempfile.mkstemp(prefix="fedround-pgpw-")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(superuser_password + "\n")
        if cluster.run_as:
            entry = pwd.getpwnam(cluster.run_as)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        _run(
            [
                *cluster.tool("initdb"),
                "-D",
                str(cluster.data_dir),
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=peer",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ],
            "initdb",
        )
    finally:
        os.unlink(pwfile)
    conf = (
        "\n# fedround: private cluster for the Prefect server\n"
        f"listen_addresses = '{HOST}'\n"
        f"unix_socket_directories = '{cluster.data_dir}'\n"
        "max_connections = 200\n"
    )
    _append_as_owner(cluster, cluster.data_dir / "postgresql.conf", conf)


def _append_as_owner(cluster: PostgresCluster, path: Path, text: str) -> None:
    with path.open("a") as handle:
        handle.write(text)
    if cluster.run_as:
        entry = pwd.getpwnam(cluster.run_as)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def start(cluster: PostgresCluster, port: int, durable: bool, timeout_s: float) -> ProcessRecord:
    """``pg_ctl start`` and wait; returns a record of the postmaster process."""
    options = f"-p {port}"
    if not durable:  # throw-away test clusters: skip fsyncs, migrations run much faster
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    started = time.monotonic()
    command = [
        *cluster.tool("pg_ctl"),
        "-D",
        str(cluster.data_dir),
        "-l",
        str(cluster.log),
        "-o",
        options,
        "-w",
        "-t",
        str(int(timeout_s)),
        "start",
    ]
    try:
        _run(command, "pg_ctl start")
    except ServiceError as exc:
        raise ServiceError(
            f"{exc}\nlast lines of {cluster.log}:\n{log_tail(cluster.log)}"
        ) from None
    pid = postmaster_pid(cluster)
    if pid is None:
        raise ServiceError(f"Postgres started but wrote no postmaster.pid in {cluster.data_dir}")
    record = ProcessRecord.of(
        "postgres",
        pid,
        {"postgres": port},
        round(time.monotonic() - started, 2),
        {"data_dir": str(cluster.data_dir), "bindir": str(cluster.bindir)},
    )
    return record


def postmaster_pid(cluster: PostgresCluster) -> int | None:
    try:
        first = (cluster.data_dir / "postmaster.pid").read_text().splitlines()[0]
        return int(first)
    except (OSError, ValueError, IndexError):
        return None


def ensure_database(port: int, superuser_password: str, password: str) -> None:
    """Create role and database ``prefect`` if missing (idempotent)."""
    bindir = find_bindir()
    psql = str(bindir / "psql") if bindir else "psql"
    env = {**os.environ, "PGPASSWORD": superuser_password, "PGCONNECT_TIMEOUT": "10"}
    base = [psql, "-h", HOST, "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-tA"]
    exists = _run(
        [*base, "-d", "postgres", "-c", f"SELECT 1 FROM pg_roles WHERE rolname='{DB_USER}'"],
        "psql (role check)",
        env,
    )
    if not exists.strip():
        _run(
            [*base, "-d", "postgres", "-c", f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{password}'"],
            "psql (create role)",
            env,
        )
    exists = _run(
        [*base, "-d", "postgres", "-c", f"SELECT 1 FROM pg_database WHERE datname='{DB_NAME}'"],
        "psql (database check)",
        env,
    )
    if not exists.strip():
        _run(
            [*base, "-d", "postgres", "-c", f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}"],
            "psql (create database)",
            env,
        )


def connection_url(port: int, password: str) -> str:
    return f"postgresql+asyncpg://{DB_USER}:{password}@{HOST}:{port}/{DB_NAME}"


def stop(record: ProcessRecord, timeout_s: float = 30) -> None:
    """``pg_ctl stop -m fast``; falls back to signals if pg_ctl cannot do it."""
    from fedround.flows.services.proc import stop_record

    data_dir = Path(record.extra.get("data_dir", ""))
    bindir = Path(record.extra.get("bindir", "")) if record.extra.get("bindir") else find_bindir()
    if record.process() is None:
        return
    if bindir is not None and data_dir.name:
        cluster = PostgresCluster(bindir, data_dir, _server_user())
        command = [
            *cluster.tool("pg_ctl"),
            "-D",
            str(data_dir),
            "-m",
            "fast",
            "-w",
            "-t",
            str(int(timeout_s)),
            "stop",
        ]
        try:
            _run(command, "pg_ctl stop")
        except ServiceError as exc:
            logger.warning("%s; stopping the postmaster with signals", exc)
    stop_record(record)


def remove_data(services_dir: Path) -> None:
    """Delete the cluster's data (the symlinked fallback folder included)."""
    link = services_dir / "postgres"
    if link.is_symlink():
        target = Path(os.readlink(link))
        link.unlink()
        shutil.rmtree(target, ignore_errors=True)
    elif link.exists():
        shutil.rmtree(link, ignore_errors=True)
