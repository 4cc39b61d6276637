"""Per-site reputation: strikes over each site's latest updates, flagging, leaving out past
the threshold (never below the quorum), the checkpointed record, and the config checks."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from fedround.tasks.aggregation import AggregationOutcome
from fedround.tasks.core.config import ReputationConfig, StrategyConfig
from fedround.tasks.core.reputation import STATE_KEY, Reputation, split_state
from fedround.tasks.core.strategies.state import split_tensors

CONFIG = ReputationConfig(window=4, flag_at=2, max_strikes=3)


def test_strikes_count_over_the_sites_last_updates_only() -> None:
    reputation = Reputation(CONFIG)
    # rounds 1-5: site a is struck in rounds 1, 2 and 5; b takes part in rounds 1 and 5 only
    for round_, struck in ((1, {"a"}), (2, {"a"}), (3, set()), (4, set()), (5, {"a"})):
        reputation.record(round_, {"a", "b"} if round_ in (1, 5) else {"a"}, struck)
    # a's window is rounds 2-5 (round 1 fell out): 2 strikes; b: 0 of 2 updates
    assert reputation.strikes("a") == 2 and reputation.updates("a") == 4
    assert reputation.strikes("b") == 0 and reputation.updates("b") == 2
    assert reputation.flagged() == ["a"]
    assert reputation.over_threshold() == []
    assert reputation.metrics(["a", "b"]) == {"site.a.strikes": 2.0, "site.b.strikes": 0.0}
    # only the sites named (those recorded in a round) are logged; unknown ones have no figure
    assert reputation.metrics(["b", "z"]) == {"site.b.strikes": 0.0}
    # a round recorded again (a resumed run repeating it) replaces its entry, never doubles
    reputation.record(5, {"a", "b"}, {"a", "b"})
    assert reputation.strikes("a") == 2 and reputation.updates("a") == 4
    assert reputation.strikes("b") == 1 and reputation.updates("b") == 2


def test_past_the_threshold_a_site_is_left_out_with_a_reason() -> None:
    reputation = Reputation(CONFIG)
    for round_ in (1, 2, 3):
        reputation.record(round_, {"a", "b", "c"}, {"a"})
    left = reputation.left_out(["a", "b", "c"], min_sites=1)
    assert left == {"a": "left out: 3 of its last 3 updates were clipped, rejected or discarded"}
    assert reputation.summary() == {"a": {"strikes": 3, "updates": 3, "past_threshold": True}}


def test_never_below_the_quorum_most_strikes_leave_first() -> None:
    reputation = Reputation(CONFIG)
    for round_ in (1, 2, 3, 4):
        reputation.record(round_, {"a", "b", "c"}, {"a", "b"} if round_ < 4 else {"a"})
    # a has 4 strikes, b 3; with min_sites = 2 only one of the three may go: a
    assert reputation.over_threshold() == ["a", "b"]
    assert list(reputation.left_out(["a", "b", "c"], min_sites=2)) == ["a"]
    assert reputation.left_out(["a", "b", "c"], min_sites=3) == {}
    # a site that is not eligible (failed its contract) is not "left out" again
    assert list(reputation.left_out(["b", "c"], min_sites=1)) == ["b"]


def test_flag_only_leaves_nobody_out() -> None:
    reputation = Reputation(ReputationConfig(window=3, flag_at=1, max_strikes=None))
    for round_ in (1, 2, 3):
        reputation.record(round_, {"a"}, {"a"})
    assert reputation.flagged() == ["a"]
    assert reputation.left_out(["a"], min_sites=0) == {}


def test_the_record_round_trips_through_the_strategy_state() -> None:
    reputation = Reputation(CONFIG)
    reputation.record(1, {"a", "b"}, {"b"})
    strategy_state = {"control": {"w": torch.zeros(1)}}
    state = reputation.with_state(strategy_state)
    # the strategy's own state is untouched, the record is plain JSON beside it
    plain, tensors = split_tensors(state)
    assert list(tensors) == ["control/w"]
    assert json.loads(json.dumps(plain))[STATE_KEY] == {"sites": {"a": [[1, 0]], "b": [[1, 1]]}}
    own, record = split_state(state)
    assert set(own) == {"control"} and record == reputation.state()
    again = Reputation.from_state(CONFIG, state)
    assert again.history == reputation.history
    assert Reputation.from_state(CONFIG, {}).history == {}
    with pytest.raises(ValueError, match="malformed"):
        Reputation.from_state(CONFIG, {STATE_KEY: [1, 2]})
    with pytest.raises(ValueError, match="without an update"):
        reputation.record(2, {"a"}, {"b"})


def test_an_outcome_strikes_clipped_rejected_and_discarded_updates_not_unreadable_ones() -> None:
    outcome = AggregationOutcome(
        weights=None,
        accepted={"a": 1, "b": 1, "c": 1, "d": 1},
        rejected={"e": "not_finite: NaN", "f": "unreadable: connection reset"},
        clipped={"b": 0.5},
        unselected=["c"],
    )
    assert outcome.checked == ["a", "b", "c", "d", "e"]
    assert outcome.struck == ["b", "c", "e"]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"window": 0}, "window"),
        ({"window": 2, "flag_at": 3, "max_strikes": 3}, "flag_at=3 can never be reached"),
        ({"flag_at": 3, "max_strikes": 2}, "max_strikes=2 must be in [flag_at, window]"),
        ({"window": 5, "max_strikes": 6}, "max_strikes=6"),
        ({"windw": 3}, "windw"),
    ],
)
def test_config_refuses_a_reputation_that_cannot_hold(raw: dict[str, int], field: str) -> None:
    with pytest.raises(ValidationError, match=field.replace("[", r"\[")):
        StrategyConfig.model_validate({"reputation": raw})


def test_the_default_flags_at_two_and_leaves_out_at_three_of_ten() -> None:
    default = StrategyConfig().reputation
    assert (default.window, default.flag_at, default.max_strikes) == (10, 2, 3)
    assert (
        StrategyConfig.model_validate({"reputation": {"max_strikes": None}}).reputation.max_strikes
        is None
    )
