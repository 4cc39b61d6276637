"""The ``fedround-auth`` alias rule without a server: who may move which alias, how the
promoters' list is read, and which aliases a set/delete request names (the real server is
tried in tests/integration/test_mlflow_auth.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedround.mlflow_plugins.auth_app import (
    CANDIDATE,
    alias_change_allowed,
    promoters_from_env,
    requested_aliases,
)

PROMOTERS = frozenset({"promoter"})


def test_candidate_matches_the_registry_constant() -> None:
    from fedround.tasks.registry import CANDIDATE as REGISTRY_CANDIDATE

    assert CANDIDATE == REGISTRY_CANDIDATE


@pytest.mark.parametrize(
    ("alias", "username", "is_admin", "allowed"),
    [
        ("candidate", "coordinator", False, True),
        ("production", "coordinator", False, False),
        ("deprecated", "coordinator", False, False),
        ("Candidate", "coordinator", False, False),  # only the exact name is free
        ("candidate ", "coordinator", False, False),
        ("production", "promoter", False, True),
        ("production", "admin", True, True),
        ("deprecated", "someone", True, True),
        ("production", "Promoter", False, False),  # user names are compared exactly
    ],
)
def test_who_may_move_an_alias(alias: str, username: str, is_admin: bool, allowed: bool) -> None:
    assert alias_change_allowed(alias, username, is_admin, PROMOTERS) is allowed


@given(alias=st.text(min_size=1).filter(lambda a: a != CANDIDATE), username=st.text())
def test_no_promoters_leaves_only_admins(alias: str, username: str) -> None:
    assert not alias_change_allowed(alias, username, False, frozenset())
    assert alias_change_allowed(alias, username, True, frozenset())
    assert alias_change_allowed(CANDIDATE, username, False, frozenset())


@pytest.mark.parametrize(
    ("value", "promoters"),
    [
        (None, frozenset()),
        ("", frozenset()),
        (" , ,", frozenset()),
        ("promoter", frozenset({"promoter"})),
        (" promoter , release-bot,,", frozenset({"promoter", "release-bot"})),
    ],
)
def test_promoters_from_env(value: str | None, promoters: frozenset[str]) -> None:
    assert promoters_from_env(value) == promoters


@pytest.mark.parametrize(
    ("body", "query", "aliases"),
    [
        (b'{"name": "m", "alias": "production", "version": "1"}', [], ["production"]),
        (b"", ["production"], ["production"]),
        (b"  ", [], []),
        (b'{"name": "m"}', [], []),
        # Old clients send the JSON object as a JSON string; MLflow decodes it twice.
        (json.dumps(json.dumps({"alias": "production"})).encode(), [], ["production"]),
        (b'{"alias": "candidate"}', ["production"], ["production", "candidate"]),
    ],
)
def test_requested_aliases(body: bytes, query: list[str], aliases: list[str]) -> None:
    assert requested_aliases(body, query) == aliases


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"just a string"', "not JSON"),
        (b'{"alias": 7}', "must be a string"),
        (b'{"alias": null}', "must be a string"),
    ],
)
def test_malformed_requests_raise_value_error(body: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        requested_aliases(body, [])
