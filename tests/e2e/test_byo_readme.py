"""The README's "Bring your own federation" walk-through, done exactly as written.

The files come from the README itself (every fenced block marked ``file=<path>``), so the
README cannot drift from what works. In a temporary folder outside the repository:
- the user's one-module package (``churn_model.py``: model factory and ``train``) and its
  ``pyproject.toml`` are pip-installed into the venv (``--no-deps --no-build-isolation``
  so that it works offline: torch and setuptools are there already), and uninstalled after;
- three sites each get the README's ``site.yaml`` (with their own name) and their own data,
  generated here: a Parquet training file and a CSV test file of a few hundred rows,
  different plan mixes per site; the coordinator gets ``holdout.csv``;
- ``fedround run federation.yaml --json`` runs in that folder, as the README says;
- the README's ``predict.py`` loads ``models:/churn-global@candidate`` with
  ``mlflow.pyfunc`` and predicts on raw rows, preprocessing included.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from .helpers import FEDROUND, cli_env, pip_installed, run_in_session

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Bring your own federation"
DISTRIBUTION = "churn-model"
SITES = {"north": (0.6, 0.3, 0.1), "south": (0.2, 0.5, 0.3), "east": (0.3, 0.3, 0.4)}
PLANS = ["basic", "pro", "enterprise"]
_BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end >= 0 else len(text)]


def readme_blocks() -> tuple[dict[str, str], list[str]]:
    """The section's files (blocks marked ``file=<path>``) and its shell blocks."""
    files: dict[str, str] = {}
    shell: list[str] = []
    for language, info, body in _BLOCK.findall(readme_section()):
        marked = re.search(r"file=(\S+)", info)
        if marked:
            files[marked.group(1)] = body
        elif language == "bash":
            shell.append(body)
    return files, shell


def customers(n: int, plan_mix: tuple[float, ...], seed: int) -> pd.DataFrame:
    """Generated customers: churn is likelier with short tenure, many support tickets and
    the basic plan."""
    rng = np.random.default_rng(seed)
    plan = rng.choice(PLANS, size=n, p=plan_mix)
    tenure = rng.integers(0, 72, size=n)
    tickets = rng.poisson(1.5, size=n)
    spend = np.round(rng.uniform(10, 120, size=n), 2)
    logit = (
        1.0
        - 0.06 * tenure
        + 0.7 * tickets
        + np.select([plan == "basic", plan == "enterprise"], [0.8, -0.8], 0.0)
    )
    churned = rng.random(n) < 1 / (1 + np.exp(-logit))
    return pd.DataFrame(
        {
            "customer_id": np.arange(n) + seed * 10_000,  # extra columns are ignored
            "tenure_months": tenure,
            "monthly_spend": spend,
            "support_tickets": tickets,
            "plan": plan,
            "churned": np.where(churned, "yes", "no"),
        }
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``my-federation/`` as the README builds it, its package installed in the venv."""
    root = tmp_path_factory.mktemp("byo-readme") / "my-federation"
    assert not root.resolve().is_relative_to(README.parent)  # outside the repository
    files, _ = readme_blocks()
    site_yaml = files.pop("sites/north/site.yaml")
    for path, body in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(body)
    for index, (site, mix) in enumerate(SITES.items()):
        folder = root / "sites" / site
        folder.mkdir(parents=True)
        (folder / "site.yaml").write_text(site_yaml.replace("site: north", f"site: {site}"))
        customers(300, mix, seed=index).to_parquet(folder / "train.parquet", index=False)
        customers(100, mix, seed=100 + index).to_csv(folder / "test.csv", index=False)
    customers(400, (1 / 3, 1 / 3, 1 / 3), seed=999).to_csv(root / "holdout.csv", index=False)
    modules = {"churn_model": root / "churn_model.py"}
    with pip_installed(root, DISTRIBUTION, modules, always_uninstall=True):
        yield root


@pytest.fixture(scope="module")
def result(project: Path) -> dict[str, Any]:
    completed = run_in_session(
        [FEDROUND, "run", "federation.yaml", "--json"],
        env=cli_env(project / ".fedround"),
        cwd=project,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.result


def test_the_readme_commands_are_the_ones_this_test_runs() -> None:
    files, shell = readme_blocks()
    assert set(files) == {
        "churn_model.py",
        "pyproject.toml",
        "federation.yaml",
        "sites/north/site.yaml",
        "contract.json",
        "predict.py",
    }
    commands = [line.split("#")[0].strip() for block in shell for line in block.splitlines()]
    for command in (
        "cd my-federation",
        "pip install .",
        "fedround run federation.yaml",
        "python predict.py",
    ):
        assert command in commands


def test_the_run_trains_every_site_with_the_users_code(result: dict[str, Any]) -> None:
    assert result["federation"] == "churn"
    assert result["rounds"] == 5
    assert result["sites"]["participating"] == ["east", "north", "south"]
    assert result["sites"]["excluded"] == {}
    assert all(h["sites_accepted"] == 3.0 for h in result["history"])
    assert result["final_metrics"]["auc"] > 0.75  # generated by a clear rule
    assert result["model"]["name"] == "churn-global"
    assert result["model"]["alias"] == "candidate"


def test_predict_py_serves_raw_rows(result: dict[str, Any], project: Path) -> None:
    done = subprocess.run(
        [sys.executable, "predict.py"], cwd=project, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    header = done.stdout.splitlines()[0].split()
    assert header == ["prediction", "probability_no", "probability_yes"]


def test_the_registered_model_ranks_raw_rows_like_the_rule(
    result: dict[str, Any], project: Path
) -> None:
    uri = result["mlflow"]["tracking_uri"]
    assert uri == f"sqlite:///{project / '.fedround' / 'mlflow.db'}"  # what predict.py uses
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/churn-global@candidate")
    rows = customers(400, (1 / 3, 1 / 3, 1 / 3), seed=999).drop(columns=["churned"])

    predicted = model.predict(rows)

    probability = predicted["probability_yes"].to_numpy()
    assert np.allclose(predicted["probability_no"] + probability, 1.0, atol=1e-6)
    assert set(predicted["prediction"]) <= {"yes", "no"}
    assert (predicted["prediction"] == "yes").tolist() == (probability > 0.5).tolist()
    risky = (rows["tenure_months"] < 12) & (rows["support_tickets"] >= 3)
    loyal = (rows["tenure_months"] > 48) & (rows["support_tickets"] == 0)
    assert probability[risky].mean() > 0.7 > 0.3 > probability[loyal].mean()
