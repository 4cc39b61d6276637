"""Start the Prefect worker that serves one site's work pool (``fedround site start``).

The worker polls the site's own pool, so the coordinator never reaches into the site:
work is pulled. It runs the site's flows in its own warm interpreter
(:mod:`.warm_worker`), whose environment carries the site's settings file (data path,
object-store credentials) to the site session without it ever leaving the site.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from fedround.tasks.core.errors import ConfigError

from .session import SITE_CONFIG_ENV
from .settings import SiteSettings, load_site_settings

WORKER_ENV = {
    # Pick up new flow runs within a second; start them up to 5 s before they are due.
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_WORKER_PREFETCH_SECONDS": "5",
    # Heartbeat often, so the coordinator sees a dead site's pool within ~20 s.
    "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
}


def worker_command(settings: SiteSettings, config_file: Path) -> tuple[list[str], dict[str, str]]:
    """The worker's command line (:mod:`.warm_worker` in this Python) and environment."""
    api_url = settings.prefect_api_url or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise ConfigError(
            f"{config_file}: set prefect_api_url (or PREFECT_API_URL) to the coordinator's "
            "Prefect server, e.g. http://127.0.0.1:4200/api"
        )
    argv = [
        sys.executable,
        "-m",
        "fedround.site_workers.warm_worker",
        "--pool",
        settings.pool,
        "--name",
        f"{settings.site}@{socket.gethostname()}",
    ]
    env = {
        **os.environ,
        **{k: v for k, v in WORKER_ENV.items() if k not in os.environ},
        SITE_CONFIG_ENV: str(config_file.resolve()),
        "PREFECT_API_URL": api_url,
    }
    return argv, env


def start_site_worker(config_file: Path) -> None:
    """Replace this process with the site's Prefect worker (for systemd, k8s, compose)."""
    settings = load_site_settings(config_file)
    if not settings.train_path.is_file():
        raise ConfigError(
            f"{config_file}: the training file {settings.train_path} does not exist: set "
            "data_dir and train_file to the site's data (then `fedround site check`)"
        )
    argv, env = worker_command(settings, config_file)
    os.chdir(config_file.resolve().parent)
    os.execvpe(argv[0], argv, env)
