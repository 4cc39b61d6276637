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
from collections.abc import Iterable, Iterator
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


def provision_demo_federation(config_path: Path, state_dir: Path) -> None:
    """Give each demo site of the federation at ``config_path`` its shard and site config
    under ``state_dir``, as ``fedround demo provision`` does (in this process)."""
    from fedround.site_workers.demo_sites import provision_demo_sites
    from fedround.tasks.core.config import load_federation_config
    from fedround.tasks.runtime import CoordinatorSettings

    os.environ["FEDROUND_STATE_DIR"] = str(state_dir)
    try:
        provision_demo_sites(load_federation_config(config_path), CoordinatorSettings.from_env())
    finally:
        del os.environ["FEDROUND_STATE_DIR"]


def write_demo_federation(state_dir: Path, name: str, config: str) -> Path:
    """Write ``config`` as ``<name>`` beside ``state_dir`` (outside the repository, so it is
    recorded as an untracked config) and provision its demo sites; returns its path."""
    path = state_dir.parent / name
    path.write_text(config)
    provision_demo_federation(path, state_dir)
    return path


def run_ok(config_path: Path, state_dir: Path, *args: str) -> dict[str, Any]:
    """``fedround run CONFIG --json ARGS``, which must succeed; its result."""
    done = fedround("run", str(config_path), "--json", *args, state_dir=state_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.result


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


# --- a federation of the user's own code and sites, in a temporary folder -----------------


def linear_arrays(n: int, seed: int, features: int = 8) -> tuple[Any, Any]:
    """A small, linearly separable two-class set: ``features`` float32 columns."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x @ np.linspace(-1.0, 1.0, features) > 0).astype(np.int64)
    return x, y


def write_array_federation(
    root: Path,
    federation: str,
    sites: dict[str, int],
    package: str,
    modules: dict[str, str],
    contract: dict[str, Any],
    configs: dict[str, str],
    features: int = 8,
) -> Path:
    """The layout a user of ``data.source: sites`` has, under ``root``:

    - ``user_pkg/<package>/<module>.py`` for each of ``modules`` (name → source), put on the
      import path by :func:`run_user_federation`, not installed;
    - ``sites/<site>/{train.npz,test.npz,site.yaml}``, ``sites[site]`` training examples
      each, every site.yaml pointing at the local object store under ``state/objects``;
    - ``fed/`` with the coordinator's ``holdout.npz``, ``contract.json`` and ``configs``
      (file name → YAML text).
    """
    from fedround.site_workers.data import save_site_data

    folder = root / "user_pkg" / package
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    for module, source in modules.items():
        (folder / f"{module}.py").write_text(source)
    for index, (site, n) in enumerate(sites.items()):
        site_dir = root / "sites" / site
        save_site_data(site_dir / "train.npz", *linear_arrays(n, seed=index, features=features))
        save_site_data(
            site_dir / "test.npz", *linear_arrays(20, seed=100 + index, features=features)
        )
        settings = {
            "site": site,
            "federation": federation,
            "data_dir": ".",
            "train_file": "train.npz",
            "test_file": "test.npz",
            "object_store": {"kind": "local", "root": str(root / "state" / "objects")},
        }
        (site_dir / "site.yaml").write_text(json.dumps(settings))
    config = root / "fed"
    config.mkdir()
    save_site_data(config / "holdout.npz", *linear_arrays(200, seed=999, features=features))
    (config / "contract.json").write_text(json.dumps(contract))
    for name, text in configs.items():
        (config / name).write_text(text)
    return root


def sites_yaml(sites: Iterable[str]) -> str:
    """The ``sites:`` list of a federation in the layout :func:`write_array_federation`
    makes (each site's ``site.yaml`` under ``../sites/<site>/``), as YAML flow text."""
    entries = ", ".join(f"{{name: {s}, config: ../sites/{s}/site.yaml}}" for s in sites)
    return f"[{entries}]"


def run_user_federation(
    root: Path, config: str = "federation.yaml", timeout: float = 600, run_id: str | None = None
) -> Completed:
    """``fedround run fed/<config> --json`` as a user runs it, with ``user_pkg`` on the import
    path of the CLI and of the site processes it spawns (see :func:`run_in_session`)."""
    env = cli_env(root / "state")
    env["PYTHONPATH"] = str(root / "user_pkg")
    argv = [FEDROUND, "run", str(root / "fed" / config), "--json"]
    return run_in_session(argv + (["--run-id", run_id] if run_id else []), env, timeout=timeout)
