"""``fedround report``'s page, drawn from hand-built models: every section is there, the
participation grid has one coloured cell per site and round with its reason, what sites
wrote is escaped, and the page needs nothing from a server. Also the pure builders that
turn a run's records into those models (participation with and without per-round rows,
and for a run that crashed)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from fedround.tasks.report_data import (
    AuditRow,
    ContractResult,
    CostLine,
    CostSummary,
    RunReport,
    SiteRound,
    TenantReport,
    TenantRun,
    VersionInfo,
    participation_from_metrics,
    participation_from_rounds,
    site_totals,
)
from fedround.tasks.report_html import STATUS_COLORS, ranges, render_run, render_tenant

EVIL = "<script>alert(1)</script>"
EVIL_REASON = 'boom" onmouseover="alert(2)" <img src=x onerror=alert(3)>'
SITES = ["site-a", "site-b", EVIL]
ROUNDS = [1, 2, 3]
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _rows() -> list[SiteRound]:
    status = {
        ("site-a", 1): ("trained", ""),
        ("site-a", 2): ("trained", ""),
        ("site-a", 3): ("trained", ""),
        ("site-b", 1): ("trained", ""),
        ("site-b", 2): ("failed", "train function raised RuntimeError"),
        ("site-b", 3): ("not selected", ""),
        (EVIL, 1): ("rejected", EVIL_REASON),
        (EVIL, 2): ("left out", "3 strikes in its last 10 updates"),
        (EVIL, 3): ("late", "late update rejected: wrong_round"),
    }
    return [
        SiteRound(
            site=site,
            round=r,
            status=status[(site, r)][0],
            reason=status[(site, r)][1],
            examples=50 if status[(site, r)][0] == "trained" else 0,
            seconds=0.5 if status[(site, r)][0] == "trained" else 0.0,
            bytes_up=1000 if status[(site, r)][0] == "trained" else 0,
            bytes_down=400,
        )
        for site in SITES
        for r in ROUNDS
    ]


def _report(**changes: object) -> RunReport:
    rows = _rows()
    report = RunReport(
        run_id="nightly-1",
        federation="clinics",
        tenant="acme",
        status="FINISHED",
        mlflow_run_id="0123abcd",
        experiment="clinics",
        tracking="/state",
        started_at=T0,
        finished_at=datetime(2026, 11, 30, 12, 3, 5, tzinfo=UTC),
        config={"config_revision": "git:abc123", "config_sha256": "f" * 64},
        rounds_planned=3,
        strategy={"name": "fedprox", "mu": "0.1", "aggregator": "mean"},
        final_metrics={"accuracy": 0.91, "loss": 0.25},
        global_metrics={
            "accuracy": [(1, 0.7), (2, 0.85), (3, 0.91)],
            "loss": [(1, 0.6), (2, 0.4), (3, 0.25)],
            "federated_accuracy": [(0, 0.3), (1, 0.72), (2, 0.86)],
        },
        site_metrics={
            "train_loss": {"site-a": [(1, 0.6), (2, 0.5), (3, 0.4)], EVIL: [(1, 9.0)]},
            "eval_accuracy": {"site-a": [(0, 0.4), (1, 0.8)]},
        },
        sites=SITES,
        rounds=ROUNDS,
        participation=rows,
        site_totals=site_totals(rows, SITES),
        contracts=[
            ContractResult(site="site-a", success=True, summary="60 rows pass", suite="s", rows=60),
            ContractResult(site=EVIL, success=False, summary=f"column {EVIL} missing"),
        ],
        versions=[
            VersionInfo(name="clinics-global", version="4", aliases=["candidate"], semver="1.2.0")
        ],
        audit=[
            AuditRow(
                sequence=7,
                at=T0,
                actor="ops@coordinator",
                action="promote",
                model="clinics-global",
                version="3",
                reason="gates passed",
            ),
            AuditRow(
                sequence=8,
                at=T0,
                actor="ops@coordinator",
                action="reject",
                model="clinics-global",
                version="4",
                reason=f"site {EVIL} dropped",
                this_run=True,
            ),
        ],
        cost=CostSummary(
            tenant="acme",
            sites=[CostLine(owner="site-a", compute_seconds=1.5, bytes_up=3000, rounds=3)],
            total=CostLine(owner="tenant total", compute_seconds=1.5, bytes_up=3000, rounds=3),
            coordinator_seconds=4.0,
            note="seconds and bytes",
        ),
    )
    return report.model_copy(update=changes)


def _lean(**changes: object) -> str:
    """A variant of the report, drawn without charts (they are checked once, below)."""
    return render_run(_report(global_metrics={}, site_metrics={}, site_totals=[], **changes))


@pytest.fixture(scope="module")
def page() -> str:
    return render_run(_report())


def _cells(page: str) -> dict[tuple[str, int], tuple[str, str, str]]:
    """(site, round) → (status, fill colour, tooltip) of every cell of the grid."""
    found = {}
    pattern = re.compile(
        r'<rect [^>]*fill="(?P<fill>[^"]+)"[^>]*data-site="(?P<site>[^"]*)" '
        r'data-round="(?P<round>\d+)" data-status="(?P<status>[^"]*)"><title>(?P<tip>[^<]*)</title>'
    )
    for match in pattern.finditer(page):
        key = (match["site"], int(match["round"]))
        found[key] = (match["status"], match["fill"], match["tip"])
    return found


def test_every_section_has_a_heading_and_an_entry_in_the_contents(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    for anchor, heading in [
        ("run", "Run"),
        ("metrics", "Metrics per round"),
        ("participation", "Participation"),
        ("sites", "Time and bytes per site"),
        ("contracts", "Data contracts"),
        ("lineage", "Lineage and promotion history"),
        ("cost", "Cost"),
    ]:
        assert f'<section id="{anchor}"><h2>{heading}</h2>' in page
        assert f'<a href="#{anchor}">{heading}</a>' in page
    assert "<h3>Registered versions</h3>" in page and "<h3>Promotion history" in page


def test_the_header_names_the_run_its_config_strategy_and_privacy(page: str) -> None:
    for text in ("clinics", "acme", "nightly-1", "FINISHED", "git:abc123", "f" * 64, "0123abcd"):
        assert text in page
    assert "<strong>fedprox</strong>" in page and "<code>mu</code>: 0.1" in page
    assert "<th>Privacy</th><td>not configured</td>" in page
    assert "(3 min 05 s)" in page  # started → finished
    assert "<code>accuracy</code> 0.9100" in page


def test_a_run_with_privacy_off_has_no_privacy_settings() -> None:
    from fedround.tasks.report_data import privacy_settings

    # what a run logs for the default section: mode off and the defaults of delta etc.
    off = {"privacy.mode": "off", "privacy.delta": "1e-05", "privacy.accountant": "pld"}
    assert privacy_settings(off, {}, {}) == {}
    on = {**off, "privacy.mode": "central", "privacy.noise_multiplier": "1.0"}
    assert privacy_settings(on, {}, {"privacy_epsilon": 2.5}) == {
        "privacy.accountant": "pld",
        "privacy.delta": "1e-05",
        "privacy.mode": "central",
        "privacy.noise_multiplier": "1.0",
        "privacy_epsilon": "2.5",
    }


def test_privacy_settings_are_listed_when_the_run_has_them() -> None:
    page = _lean(privacy={"privacy.noise_multiplier": "1.1", "epsilon": "2.5"})

    assert "not configured" not in page
    assert "<code>privacy.noise_multiplier</code>: 1.1" in page


def test_metrics_are_inline_svg_charts_with_their_values(page: str) -> None:
    charts = re.findall(r'<div class="chart"><svg [^>]*aria-label="([^"]*)"', page)
    # accuracy (central + federated), loss; train_loss and eval_accuracy at each site;
    # time and bytes per site
    assert charts == [
        "accuracy per round",
        "loss per round",
        "train_loss at each site",
        "eval_accuracy at each site",
        "time and bytes per site",
    ]
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page  # prologs stripped
    assert '<td class="num">0.8500</td>' in page  # accuracy after round 2, in the values


def test_the_participation_grid_has_one_coloured_cell_per_site_and_round(page: str) -> None:
    # Prepare
    report = _report()

    # Execute
    cells = _cells(page)

    # Assert
    escaped_evil = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert set(cells) == {(s, r) for s in ["site-a", "site-b", escaped_evil] for r in ROUNDS}
    for row in report.participation:
        site = escaped_evil if row.site == EVIL else row.site
        status, fill, tip = cells[(site, row.round)]
        assert status == row.status
        assert fill == STATUS_COLORS[row.status]
        assert tip.startswith(f"{site} · round {row.round}: {row.status}")
    assert cells[("site-b", 2)][2] == (
        "site-b · round 2: failed — train function raised RuntimeError"
    )
    assert cells[("site-a", 1)][2] == "site-a · round 1: trained (50 examples, 0.50 s)"


def test_the_legend_counts_statuses_and_the_reasons_are_tabled_with_their_rounds() -> None:
    rows = [
        SiteRound(site="site-x", round=r, status="excluded", reason="fails contract")
        for r in (1, 2, 3, 5)
    ]
    page = _lean(participation=[*_rows(), *rows], sites=[*SITES, "site-x"])

    assert 'excluded <span class="muted">(4)</span>' in page
    assert 'trained <span class="muted">(4)</span>' in page
    assert re.search(
        r"<td>site-x</td><td>.*?excluded</td><td>1–3, 5</td><td>fails contract</td>", page
    )


def test_what_sites_wrote_is_escaped_everywhere(page: str) -> None:
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert 'onmouseover="' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "boom&quot; onmouseover=&quot;alert(2)&quot; &lt;img src=x onerror=alert(3)&gt;" in page


def test_a_page_needs_nothing_from_a_server(page: str) -> None:
    assert not re.search(r"<(script|link|iframe|img)\b", page, re.IGNORECASE)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert not re.search(r"url\((?!#)", page)  # only references inside the page


def test_a_run_without_per_round_detail_says_so() -> None:
    page = _lean(round_detail=False)

    assert "Per-round detail is missing" in page


def test_missing_contracts_versions_audit_and_cost_are_said_plainly() -> None:
    page = _lean(contracts=None, versions=[], audit=[], cost=None)

    assert "Not recorded: the run has no lineage/contracts.json" in page
    assert "This run registered no model version" in page
    assert "Not recorded: the run has no cost/cost.json" in page


def test_lineage_lists_versions_aliases_and_marks_this_runs_audit_entries(page: str) -> None:
    assert "<td><code>clinics-global</code></td><td>4</td><td>1.2.0</td><td>candidate</td>" in page
    ours = re.findall(r'<tr class="ours"><td class="num">(\d+)</td>', page)
    assert ours == ["8"]
    assert "<strong>reject</strong>" in page and "<strong>promote</strong>" in page


def test_the_tenant_dashboard_tables_every_run_and_plots_the_final_metric() -> None:
    # Prepare
    runs = [
        TenantRun(
            run_id=f"run-{n}",
            federation="clinics" if n % 2 else "banks",
            mlflow_run_id=f"m{n}",
            status="FINISHED" if n != 2 else "FAILED",
            started_at=datetime(2026, 11, 20 + n, tzinfo=UTC),
            rounds_completed=3,
            rounds_planned=3,
            final_value=0.8 + n / 100 if n != 2 else None,
            sites_trained=3,
            sites_listed=4,
            versions=[VersionInfo(name="clinics-global", version=str(n), aliases=["production"])]
            if n == 3
            else [],
        )
        for n in (3, 2, 1)
    ]

    # Execute
    page = render_tenant(TenantReport(tenant="acme", tracking="/state", runs=runs))

    # Assert
    assert '<section id="trend">' in page and '<section id="runs"><h2>Runs (3)</h2>' in page
    assert '<svg role="img" aria-label="final accuracy per run over time"' in page
    for n in (1, 2, 3):
        assert f"<code>run-{n}</code>" in page
    assert "<code>clinics-global</code> v3 (production)" in page
    assert "<code>accuracy</code> 0.8300" in page and "<code>accuracy</code> —" in page
    assert "3 of 4" in page


def test_ranges_collapse_consecutive_rounds() -> None:
    assert ranges([5, 1, 2, 3, 8, 7]) == "1–3, 5, 7–8"
    assert ranges([]) == ""
    assert ranges([4]) == "4"


# --- the pure builders --------------------------------------------------------------------


def test_rounds_without_site_rows_are_rebuilt_from_their_outcome_fields() -> None:
    # Prepare: round 1 everyone trains (c not selected); round 2 b fails and its update
    # turns up late in round 3; d is excluded by its contract throughout
    rounds = {
        "1": {"round": 1, "selected": ["a", "b"], "accepted": {"a": 10, "b": 20}},
        "2": {
            "round": 2,
            "selected": ["a", "b", "c"],
            "accepted": {"a": 10},
            "failed": {"b": "timeout"},
            "rejected": {"c": "norm_too_large: 9.1 > 5"},
        },
        "3": {
            "round": 3,
            "selected": ["a", "c"],
            "accepted": {"a": 10, "c": 5},
            "late": {"b (round 2)": "late update rejected: wrong_round"},
            "left_out": {"b": "3 strikes"},
        },
    }
    series = {"a": {"seconds": [(1, 0.5), (2, 0.25), (3, 0.25)], "bytes_up": [(1, 100.0)]}}

    # Execute
    rows, numbers, notes = participation_from_rounds(
        rounds, ["a", "b", "c", "d"], {"d": "fails contract"}, series
    )

    # Assert
    cell = {(r.site, r.round): r for r in rows}
    assert numbers == [1, 2, 3] and notes == []
    assert [cell[("a", r)].status for r in numbers] == ["trained"] * 3
    assert [cell[("b", r)].status for r in numbers] == ["trained", "late", "left out"]
    assert cell[("b", 2)].reason == "timeout; then late update rejected: wrong_round"
    assert [cell[("c", r)].status for r in numbers] == ["not selected", "rejected", "trained"]
    assert [cell[("d", r)].status for r in numbers] == ["excluded"] * 3
    assert cell[("a", 1)].seconds == 0.5 and cell[("a", 1)].bytes_up == 100
    assert cell[("b", 1)].examples == 20
    assert [r.site for r in rows[:3]] == ["a", "a", "a"]  # sites in config order, then rounds


def test_site_rows_are_used_as_recorded_when_a_round_has_them() -> None:
    rounds = {
        "1": {
            "round": 1,
            "accepted": {"a": 10},
            "sites": [
                {"site": "a", "status": "trained", "examples": 10, "seconds": 1.5, "bytes_up": 7},
                {"site": "e", "status": "excluded", "reason": "contract"},
                {"site": "b (round 0)", "status": "late", "reason": "too late"},
                "not a row",
            ],
        },
        "x": {},
    }

    rows, numbers, notes = participation_from_rounds(rounds, ["a"], {}, {})

    cell = {(r.site, r.round): r for r in rows}
    assert numbers == [0, 1]
    assert cell[("a", 1)].seconds == 1.5 and cell[("a", 1)].bytes_up == 7
    assert cell[("e", 1)].status == "excluded" and cell[("e", 1)].reason == "contract"
    assert cell[("b", 0)].status == "late"
    assert cell[("a", 0)].status == "not selected"
    assert notes == ["lineage/rounds.json: entry 'x' is not a round number, skipped"]


def test_a_crashed_run_is_rebuilt_from_the_site_metrics() -> None:
    series = {
        "a": {"seconds": [(1, 0.5), (2, 0.5)], "num_examples": [(1, 10.0), (2, 10.0)]},
        "b": {"seconds": [(1, 0.25)], "train_loss": [(1, 0.5)]},
    }

    rows = participation_from_metrics(series, ["a", "b", "c"], {"c": "contract"}, [1, 2])

    assert [(r.site, r.round, r.status) for r in rows] == [
        ("a", 1, "trained"),
        ("a", 2, "trained"),
        ("b", 1, "trained"),
        ("b", 2, "no record"),
        ("c", 1, "excluded"),
        ("c", 2, "excluded"),
    ]
    assert rows[2].metrics == {"train_loss": 0.5} and rows[0].examples == 10


@pytest.mark.parametrize("seconds", [[0.5, 0.25, 0.0], [0.0]])
def test_site_totals_add_up_time_and_bytes(seconds: list[float]) -> None:
    rows = [
        SiteRound(site="a", round=n, status="trained", seconds=s, bytes_up=10, bytes_down=4)
        for n, s in enumerate(seconds, 1)
    ]

    [total] = site_totals(rows, ["a"])

    assert total.seconds_total == sum(seconds)
    assert total.seconds_median == (0.375 if len(seconds) == 3 else 0.0)
    assert (total.bytes_up, total.bytes_down) == (10 * len(seconds), 4 * len(seconds))
    assert total.rounds_trained == len(seconds)
