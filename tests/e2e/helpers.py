"""Run the real ``fedround`` command line in a separate process, as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FEDROUND = str(Path(sys.executable).with_name("fedround"))


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        return json.loads(self.stdout.strip().splitlines()[-1])


def cli_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["FEDROUND_STATE_DIR"] = str(state_dir)
    env["FEDROUND_SITE_PROCESSES"] = "2"
    return env


def fedround(*args: str, state_dir: Path, timeout: float = 600) -> Completed:
    done = subprocess.run(
        [FEDROUND, *args],
        env=cli_env(state_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Completed(done.returncode, done.stdout, done.stderr)


def start_fedround(*args: str, state_dir: Path) -> subprocess.Popen[str]:
    """Start the CLI in its own process group, so a test can kill the whole tree at once."""
    return subprocess.Popen(
        [FEDROUND, *args],
        env=cli_env(state_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run_in_session(
    argv: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 600
) -> Completed:
    """Run a command in its own session with its output in files; once it exits, end what
    it left behind in that session. (``fedround run`` has been seen to leave Prefect's
    temporary server running after it exits, holding its stdout and stderr open: a caller
    reading them through pipes would wait for that server forever.)"""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=err, text=True, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        out.seek(0)
        err.seek(0)
        return Completed(code, out.read(), err.read())
