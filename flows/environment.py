"""Process environment for Prefect, MLflow and Great Expectations, set before they import.

Telemetry is off by default; the user can still override any of these variables.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from fedround.tasks.core.errors import FedroundError

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}
PREFECT_SERVER_TUNING = {
    # Prefect's server records client-side task runs from their events one event per
    # database write by default; a demo run emits about 1,200 such events. Writing them in
    # batches (flushed at least every second, and when the server stops) halves the
    # server's CPU time, which on a small machine is taken from the sites' training:
    # median embedded round 0.41 s -> 0.35 s here. Task runs reach the database up to 1 s
    # later, and all of them before the temporary server stops, so this is set for the
    # embedded default only; a long-lived server keeps Prefect's write-through default.
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}
QUIET = {
    # MLflow draws a progress bar for every artifact download; the CLI has its own.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # ...and prints run links to stdout, where `--json` promises only the result.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def configure(state_dir: Path, quiet_console: bool = True) -> None:
    """Point Prefect at ``state_dir`` (unless a server is configured) and silence telemetry."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    os.environ["FEDROUND_STATE_DIR"] = str(state_dir)
    os.environ.setdefault("PREFECT_HOME", str(state_dir / "prefect"))
    # Prefect creates its home only one level deep: a fresh, nested state dir must exist.
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    if not os.environ.get("PREFECT_API_URL"):  # the embedded temporary server
        for name, value in PREFECT_SERVER_TUNING.items():
            os.environ.setdefault(name, value)
    # Rounds and site task runs log at INFO to the Prefect API (the UI shows them);
    # the terminal shows the progress bar and warnings only.
    if quiet_console:
        for name, value in QUIET.items():
            os.environ.setdefault(name, value)
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def start_prefect_early() -> threading.Thread | None:
    """Boot Prefect's temporary local server in the background, now.

    Without ``PREFECT_API_URL`` the first flow call starts a temporary server and waits
    for it (seconds). Starting it first lets that overlap with the rest of start-up; join
    the returned thread before the first flow call. ``None`` when a server is configured.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None

    def boot() -> None:
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().start()  # the client finds this same instance later

    thread = threading.Thread(target=boot, name="fedround-prefect-boot", daemon=True)
    thread.start()
    return thread


class _KnownErrorFilter(logging.Filter):
    """Keep tracebacks of fedround's own, explained errors off the terminal.

    The CLI prints their message as one clear line; the Prefect API (and so the UI) still
    receives the full record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, FedroundError)


def quiet_known_errors() -> None:
    """Attach the filter to Prefect's console handlers (call after importing Prefect)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(_KnownErrorFilter())
