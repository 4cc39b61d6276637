"""``fedround report`` end to end, on a real small embedded run.

Scenario: four sites bring their own files; site-d's data has a ninth feature, so it fails
the data contract and is excluded; the user's ``train`` raises at site-c in round 2 only.
The run finishes (three rounds), registers version 1 with alias ``candidate``; an audit
entry about that version is appended to the federation's log.

- ``fedround report <run-id>`` writes one HTML file under ``<state>/reports/`` and prints its
  path; the file has every section, inline SVG plots, the participation grid with site-c's
  failure in round 2 and site-d excluded in every round (with the reasons), the contract
  results, the registered version and its audit entry, and the cost;
- an unknown run id ends with one ``error:`` line listing the known runs, exit code 1;
- ``fedround report --tenant`` writes a dashboard that lists the run; an unknown tenant
  lists the known ones;
- without ``lineage/rounds.json`` (a crashed run) the report is rebuilt from the per-site
  metrics and says the per-round detail is missing (written where ``--out`` says).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from fedround.site_workers.data import save_site_data
from fedround.tasks.audit import AuditLog
from fedround.tasks.object_store import LocalObjectStore

from .helpers import (
    fedround,
    linear_arrays,
    run_user_federation,
    sites_yaml,
    write_array_federation,
)

pytestmark = pytest.mark.slow

FEDERATION = "e2e-report"
TENANT = "acme-e2e"
RUN_ID = "report-e2e-1"
MODEL = f"{FEDERATION}-global"
SITES = {"site-a": 60, "site-b": 40, "site-c": 50, "site-d": 30}
SECTIONS = (
    "Run",
    "Metrics per round",
    "Participation",
    "Time and bytes per site",
    "Data contracts",
    "Lineage and promotion history",
    "Cost",
)
AUDIT_REASON = "e2e: held back for review"

USER_TRAIN = '''
"""Full-batch SGD; fails at site-c in round 2 (a feature store outage)."""

import torch
import torch.nn.functional as F


def train(model, data, settings, context):
    if context.site == "site-c" and context.round == 2:
        raise RuntimeError("cannot reach the feature store")
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
    loss = torch.tensor(0.0)
    for _ in range(settings.local_epochs):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data.features), data.labels)
        loss.backward()
        optimizer.step()
    return {"loss": loss.item()}
'''

CONTRACT = {
    "name": "report-arrays",
    "expectations": [
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "n_features", "min_value": 8, "max_value": 8},
        }
    ],
}


def federation_yaml() -> str:
    return textwrap.dedent(
        f"""\
        federation: {FEDERATION}
        tenant: {TENANT}
        seed: 3
        rounds: 3
        data: {{kind: arrays, source: sites}}
        model: {{factory: logistic_regression, in_features: 8, out_features: 2}}
        training: {{train: 'fr_e2e_report.fit:train', local_epochs: 3, learning_rate: 0.5,
                    timeout_s: 120}}
        evaluation: {{holdout: holdout.npz}}
        selection: {{min_sites: 2, deadline_s: 120}}
        contract: contract.json
        sites: {sites_yaml(SITES)}
        """
    )


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state dir of one finished run, with an audit entry about its model version."""
    root = write_array_federation(
        tmp_path_factory.mktemp("report"),
        FEDERATION,
        SITES,
        package="fr_e2e_report",
        modules={"fit": USER_TRAIN},
        contract=CONTRACT,
        configs={"federation.yaml": federation_yaml()},
    )
    # site-d's table has a ninth feature: its data contract fails, it is excluded
    save_site_data(root / "sites" / "site-d" / "train.npz", *linear_arrays(30, seed=3, features=9))
    done = run_user_federation(root, run_id=RUN_ID)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.result["model"]["version"] == "1"
    store = LocalObjectStore(root / "state" / "objects")
    AuditLog(store, FEDERATION).append(
        "reject", MODEL, version="1", reason=AUDIT_REASON, actor="e2e-test"
    )
    return root / "state"


@pytest.fixture(scope="module")
def report(state: Path) -> str:
    done = fedround("report", RUN_ID, state_dir=state, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path == (state / "reports" / f"{RUN_ID}.html").resolve()
    return path.read_text(encoding="utf-8")


def _cell(page: str, site: str, round_: int) -> tuple[str, str]:
    """(status, tooltip) of a site's cell in the participation grid."""
    match = re.search(
        rf'data-site="{re.escape(site)}" data-round="{round_}" data-status="([^"]+)">'
        r"<title>([^<]*)</title>",
        page,
    )
    assert match, f"no cell for {site} in round {round_}"
    return match[1], match[2]


def test_the_report_has_every_section_and_inline_plots(report: str) -> None:
    assert report.startswith("<!DOCTYPE html>")
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in report
    assert "<svg" in report
    assert re.search(r'aria-label="accuracy per round"', report)
    assert re.search(r'aria-label="train_loss at each site"', report)
    assert not re.search(r"<(script|link|img)\b", report)  # self-contained
    for text in (FEDERATION, TENANT, RUN_ID, "FINISHED", "fedavg", "not configured"):
        assert text in report
    for site in SITES:
        assert site in report


def test_the_participation_grid_shows_the_failure_and_the_exclusion(report: str) -> None:
    for round_ in (1, 2, 3):
        assert _cell(report, "site-a", round_)[0] == "trained"
        assert _cell(report, "site-b", round_)[0] == "trained"
        status, tip = _cell(report, "site-d", round_)
        assert status == "excluded"
        assert "fails data contract" in tip
    assert _cell(report, "site-c", 1)[0] == "trained"
    status, tip = _cell(report, "site-c", 2)
    assert status == "failed"
    assert "cannot reach the feature store" in tip
    assert _cell(report, "site-c", 3)[0] == "trained"
    # the reasons, tabled under the grid
    assert re.search(r"<td>site-c</td><td>.*?failed</td><td>2</td><td>failed: train", report)
    assert re.search(r"<td>site-d</td><td>.*?excluded</td><td>1–3</td>", report)


def test_contracts_versions_audit_and_cost_are_reported(report: str) -> None:
    assert re.search(r"<td>site-d</td><td><strong[^>]*>FAIL</strong>", report)
    assert re.search(r"<td>site-a</td><td><strong[^>]*>pass</strong>", report)
    assert f"<td><code>{MODEL}</code></td><td>1</td><td>1.0.0</td><td>candidate</td>" in report
    assert re.search(rf'<tr class="ours">.*?<strong>reject</strong>.*?{AUDIT_REASON}', report)
    assert '<section id="cost">' in report and "tenant total" in report


def test_an_unknown_run_lists_the_known_ones(state: Path) -> None:
    done = fedround("report", "no-such-run", state_dir=state, timeout=300)

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no run no-such-run; runs under {state.resolve()}: {RUN_ID}"]


def test_the_tenant_dashboard_lists_the_run(state: Path) -> None:
    done = fedround("report", "--tenant", TENANT, state_dir=state, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path == (state / "reports" / f"tenant-{TENANT}.html").resolve()
    page = path.read_text(encoding="utf-8")
    assert f"<code>{RUN_ID}</code>" in page
    assert FEDERATION in page and "<svg" in page
    assert f"<code>{MODEL}</code> v1 (candidate)" in page

    unknown = fedround("report", "--tenant", "nobody", state_dir=state, timeout=300)
    assert unknown.returncode == 1
    assert f"error: no runs of tenant nobody; tenants under {state.resolve()}: {TENANT}" in (
        unknown.stderr
    )


def test_a_run_without_round_records_is_rebuilt_from_its_metrics(
    state: Path, tmp_path: Path
) -> None:
    # Prepare: the run as if it had crashed before writing lineage/rounds.json; the report
    # goes where --out says (folders made)
    [rounds_file] = (state / "mlartifacts" / FEDERATION).glob("*/artifacts/lineage/rounds.json")
    hidden = rounds_file.with_name("rounds.json.hidden")
    rounds_file.rename(hidden)
    try:
        # Execute
        target = tmp_path / "deep" / "crashed.html"
        done = fedround("report", RUN_ID, "--out", str(target), state_dir=state, timeout=300)
    finally:
        hidden.rename(rounds_file)

    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(target.resolve())
    page = target.read_text(encoding="utf-8")
    assert "Per-round detail is missing" in page
    assert _cell(page, "site-c", 2)[0] == "no record"
    assert _cell(page, "site-c", 3)[0] == "trained"
    assert _cell(page, "site-d", 1)[0] == "excluded"  # from the contract results
