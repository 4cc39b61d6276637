"""Run the real ``fedround`` command line in a separate process, as a user would."""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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


def _same_code(modules: dict[str, Path]) -> bool:
    """Whether every module imports from files equal to its source (file or package dir)."""
    importlib.invalidate_caches()
    for name, source in modules.items():
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            return False
        installed = Path(spec.origin)
        pairs = (
            [(path, installed.parent / path.name) for path in source.glob("*.py")]
            if source.is_dir()
            else [(source, installed)]
        )
        if not all(b.exists() and filecmp.cmp(a, b, shallow=False) for a, b in pairs):
            return False
    return True


def _pip(*args: str, cwd: Path | None = None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed: {done.stderr[-3000:]}")


@contextlib.contextmanager
def pip_installed(
    project: Path, distribution: str, modules: dict[str, Path], always_uninstall: bool
) -> Iterator[None]:
    """A test's package in this venv, as a user installs it: ``pip install`` of its
    folder (``--no-deps --no-build-isolation``: offline, its dependencies are here), unless
    the same code is installed already. Test runs share the venv, so each holds a shared lock
    while it uses the package, installs one at a time, and only the last one out uninstalls
    it: when it installed it, or with ``always_uninstall``."""
    folder = Path(sys.prefix)
    with (
        (folder / f".{distribution}.use.lock").open("w") as use,
        (folder / f".{distribution}.install.lock").open("w") as install,
    ):
        fcntl.flock(use, fcntl.LOCK_SH)
        installed_here = False
        try:
            fcntl.flock(install, fcntl.LOCK_EX)
            try:
                if not _same_code(modules):
                    _pip("install", "--no-deps", "--no-build-isolation", ".", cwd=project)
                    installed_here = True
                    importlib.invalidate_caches()
            finally:
                fcntl.flock(install, fcntl.LOCK_UN)
            yield
        finally:
            fcntl.flock(use, fcntl.LOCK_UN)
            if installed_here or always_uninstall:
                with contextlib.suppress(BlockingIOError):  # another run still uses it
                    fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    try:
                        _pip("uninstall", "--yes", distribution)
                    finally:
                        fcntl.flock(use, fcntl.LOCK_UN)
