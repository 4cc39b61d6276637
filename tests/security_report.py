"""pytest plugin: the ``security`` marker and the security scenario summary.

``@pytest.mark.security("<finding id>", ...)`` names the findings of :mod:`tests.security`
a test tries; an unknown id stops the session at collection. After the tests, the
terminal summary counts, per finding, the scenarios tried and how many were refused or
survived (the test passed), and lists the findings that are still open.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.security import BY_ID, FINDINGS

_findings: dict[str, tuple[str, ...]] = {}  # test node id → the findings it tries
_outcomes: dict[str, str] = {}  # test node id → passed | failed | skipped


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "security(*finding_ids): a scenario of the security suite (tests/security.py)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marks = list(item.iter_markers("security"))
        if not marks:
            continue
        ids = tuple(a for mark in marks for a in mark.args)
        unknown = [a for a in ids if a not in BY_ID]
        if not ids or unknown:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.security needs finding ids of tests/security.py"
                + (f"; unknown: {', '.join(map(str, unknown))}" if unknown else "")
            )
        _findings[item.nodeid] = ids


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _findings:
        return
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped and _outcomes.get(report.nodeid) != "failed":
        _outcomes[report.nodeid] = "skipped"
    elif report.when == "call" and report.passed:
        _outcomes.setdefault(report.nodeid, "passed")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _outcomes:
        return
    tried: dict[str, list[str]] = defaultdict(list)
    for nodeid, outcome in _outcomes.items():
        for finding in _findings[nodeid]:
            tried[finding].append(outcome)
    write = terminalreporter.write_line
    terminalreporter.section("security scenarios")
    for finding in FINDINGS:
        outcomes = tried.get(finding.id, [])
        if outcomes:
            held = outcomes.count("passed")
            failed = outcomes.count("failed")
            figures = f"{len(outcomes):3d} tried, {held:3d} refused or survived"
            figures += f", {failed} FAILED" if failed else ""
        else:
            figures = "  not tried in this session"
        write(f"{finding.id:<24} {finding.status:<8} {figures}")
    total = len(_outcomes)
    held = sum(1 for o in _outcomes.values() if o == "passed")
    write(f"{total} scenarios tried, {held} refused or survived")
    for finding in FINDINGS:
        if finding.status != "refused":
            write(f"{finding.status}: {finding.id}: {finding.note}")
