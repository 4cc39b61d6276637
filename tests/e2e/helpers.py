"""Run the real ``fedround`` command line in a separate process, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
