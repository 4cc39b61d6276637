"""The run pointer assigns each site the round it is to serve; announcing a round again
adds sites to its plan (``mode: async`` sends each site the current version when it is
idle), and a session serves each assignment once.

The distributed dispatcher is driven over a real local object store; its sessions count as
joining (started a moment ago), so no Prefect server is asked about pools.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from fedround.flows.distributed import DistributedDispatcher, _Session
from fedround.site_workers.session_protocol import assignment as _assignment
from fedround.site_workers.site_round import RoundSpec
from fedround.tasks.core import keys
from fedround.tasks.core.config import load_federation_config
from fedround.tasks.object_store import LocalObjectStore

CONFIG = Path(__file__).parents[1] / "e2e" / "distributed.yaml"
RUN = "run-1"


@pytest.fixture
def dispatcher(tmp_path: Path) -> DistributedDispatcher:
    config = load_federation_config(CONFIG)
    fed = DistributedDispatcher(config, LocalObjectStore(tmp_path), join_timeout_s=600)
    fed.run_id = RUN
    for site in ("site-a", "site-b", "site-c"):
        fed.sessions[site] = _Session(attempt=1, started_at=time.monotonic())
    return fed


def _spec(fed: DistributedDispatcher, site: str, round_: int, nonce: str) -> RoundSpec:
    return RoundSpec(
        federation=fed.config.federation,
        run_id=RUN,
        round=round_,
        site=site,
        nonce=nonce,
        global_sha256="0" * 64,
        seed=1,
        model=fed.config.model,
        training=fed.config.training,
    )


def _json(fed: DistributedDispatcher, key: str) -> dict[str, Any]:
    return json.loads(fed.store.get(key))


def test_a_round_announced_again_gains_sites_and_each_keeps_its_assignment(
    dispatcher: DistributedDispatcher,
) -> None:
    fed, name = dispatcher, dispatcher.config.federation
    assert fed.announce_round(2, "n2", [_spec(fed, "site-a", 2, "n2")], time.time() + 60) == []
    fed.announce_round(2, "n2", [_spec(fed, "site-b", 2, "n2")], time.time() + 90)
    plan = _json(fed, keys.round_plan_key(name, RUN, 2))
    assert sorted(plan["specs"]) == ["site-a", "site-b"]
    fed.announce_round(3, "n3", [_spec(fed, "site-a", 3, "n3")], time.time() + 60)
    pointer = _json(fed, keys.run_pointer_key(name, RUN))
    assert (pointer["round"], pointer["nonce"]) == (3, "n3")
    assert pointer["assigned"] == {"site-a": [3, "n3"], "site-b": [2, "n2"]}
    # a new nonce for a round starts its plan afresh (a resumed coordinator's round)
    fed.announce_round(3, "m3", [_spec(fed, "site-c", 3, "m3")], time.time() + 60)
    assert sorted(_json(fed, keys.round_plan_key(name, RUN, 3))["specs"]) == ["site-c"]


def test_a_synchronous_round_assigns_every_selected_site(dispatcher: DistributedDispatcher) -> None:
    fed = dispatcher
    specs = [_spec(fed, site, 1, "n1") for site in ("site-a", "site-c")]
    fed.announce_round(1, "n1", specs, time.time() + 60)
    pointer = _json(fed, keys.run_pointer_key(fed.config.federation, RUN))
    assert _assignment(pointer, "site-a") == (1, "n1")
    assert _assignment(pointer, "site-c") == (1, "n1")
    assert _assignment(pointer, "site-b") is None  # not selected: nothing to serve


@pytest.mark.parametrize(
    "pointer",
    [
        {},
        {"assigned": []},
        {"assigned": {"site-a": "1"}},
        {"assigned": {"site-a": [1]}},
        {"assigned": {"site-a": ["1", "n"]}},
        {"assigned": {"site-a": [True, "n"]}},
        {"assigned": {"site-a": [0, "n"]}},
    ],
)
def test_a_malformed_assignment_is_no_assignment(pointer: dict[str, Any]) -> None:
    assert _assignment(pointer, "site-a") is None
