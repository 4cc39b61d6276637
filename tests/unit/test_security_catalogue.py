"""The security scenario suite stays whole: every finding of the hardening review that is
refused (or partly) has scenarios that try it, and every scenario names a known finding."""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

from tests.security import BY_ID, FINDINGS, Finding

TESTS = Path(__file__).resolve().parents[1]


@cache
def _marked() -> dict[str, list[str]]:
    """finding id → the tests (``file::name``, or ``file`` for a module mark) naming it."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        decorated = {  # a decorator → the test it marks (a module's pytestmark has none)
            id(decorator): f"::{function.name}"
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
            for decorator in function.decorator_list
        }
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "security"
                and ast.unparse(node.func.value) == "pytest.mark"
            ):
                continue
            owner = decorated.get(id(node), "")
            for arg in node.args:
                assert isinstance(arg, ast.Constant), f"{path}: finding ids must be literals"
                found[str(arg.value)].append(f"{path.relative_to(TESTS)}{owner}")
    return found


def test_finding_ids_are_unique_and_open_ones_say_what_is_missing() -> None:
    assert len(BY_ID) == len(FINDINGS)
    for finding in FINDINGS:
        if finding.status != "refused":
            assert finding.note, f"{finding.id} is {finding.status}: say what is missing"


def test_every_mark_names_a_known_finding() -> None:
    unknown = {fid: where for fid, where in _marked().items() if fid not in BY_ID}
    assert unknown == {}


@pytest.mark.parametrize("finding", [f for f in FINDINGS if f.status != "open"], ids=lambda f: f.id)
def test_every_defended_finding_has_scenarios(finding: Finding) -> None:
    assert finding.id in _marked(), f"no test carries @pytest.mark.security({finding.id!r})"


def test_the_suite_tries_both_refusals_and_real_server_runs() -> None:
    marked = _marked()
    where = {test for tests in marked.values() for test in tests}
    assert sum(len(tests) for tests in marked.values()) >= 40
    assert any(test.startswith("e2e/") for test in where)
    assert any(test.startswith("integration/") for test in where)
