"""Run the real ``fedround`` command line from a benchmark, as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from typing import Any


def run_cli(argv: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float]:
    """``fedround run --json`` in its own session, output in files; returns result.json and
    the command's wall time. Once it exits, whatever it left behind in its session is ended
    (it has been seen to leave Prefect's temporary server running, holding its output)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            argv, env=env, stdout=out, stderr=err, text=True, start_new_session=True
        )
        try:
            code = process.wait()
        finally:
            seconds = time.perf_counter() - started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {code}:\n{err.read()[-3000:]}")
        return json.loads(out.read().strip().splitlines()[-1]), seconds
