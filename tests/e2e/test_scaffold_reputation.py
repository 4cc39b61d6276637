"""SCAFFOLD and site reputation end to end, with a site that boosts its updates.

Scenario (NVFlare-style): trigger → fault → expected state.
- Five sites bring their own ``.npz`` files; the federation trains ``logistic_regression``
  with SCAFFOLD (``strategy: {name: scaffold}``) through a user's own ``train``.
- site-x scales its update ×20 every round (a model-replacement attempt). Median-norm
  clipping (on by default) cuts it back in rounds 1 and 2: two strikes, and with
  ``reputation: {flag_at: 2, max_strikes: 2}`` it is flagged and left out of round 3
  with its reason (its record read back from round 2's checkpoint); result.json and the
  MLflow run (a tag, strikes per round) say so.
- SCAFFOLD's state is where it belongs: each site keeps its own control variate on its
  disk (the round it was computed in and its value), the coordinator checkpoints c, and
  the final model equals SCAFFOLD computed here with the same core code (site corrections,
  clipping of site-x, c ← c + Σ Δcᵢ / N), to float tolerance.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from fedround.site_workers.data import load_dataset
from fedround.site_workers.site_state import SiteState
from fedround.tasks.checkpoints import load_checkpoint
from fedround.tasks.core.config import load_federation_config
from fedround.tasks.core.hooks import ControlVariate, apply_update_hooks, hooks_installed
from fedround.tasks.core.models import build_model
from fedround.tasks.core.strategies import build_strategy
from fedround.tasks.core.strategies.scaffold import server_control
from fedround.tasks.core.usercode import RoundContext, load_weights
from fedround.tasks.lineage import build_lineage, render_text
from fedround.tasks.object_store import LocalObjectStore

from .helpers import run_user_federation, write_array_federation

pytestmark = pytest.mark.slow

FEDERATION = "e2e-scaffold"
SITES = {"site-a": 60, "site-b": 40, "site-c": 50, "site-d": 45, "site-x": 55}
ATTACKER = "site-x"
ROUNDS = 3
TRAIN = "fr_e2e_scaffold.fit:train"

USER_TRAIN = '''
"""A user's own loop: full-batch SGD on cross-entropy. At site-x it boosts its update."""

import torch
import torch.nn.functional as F


def train(model, data, settings, context):
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
    loss = torch.tensor(0.0)
    for _ in range(settings.local_epochs):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data.features), data.labels)
        loss.backward()
        optimizer.step()
    if context.site == "site-x":
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), start):
                p.copy_(p0 + 20.0 * (p - p0))
    return {"loss": loss.item()}
'''

CONTRACT = {
    "name": "scaffold-arrays",
    "expectations": [
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "label", "value_set": [0, 1]},
        },
    ],
}


FEDERATION_YAML = textwrap.dedent(
    f"""\
    federation: {FEDERATION}
    tenant: test
    seed: 5
    rounds: {ROUNDS}
    data: {{kind: arrays, source: sites}}
    model: {{factory: logistic_regression, in_features: 6, out_features: 2}}
    training: {{train: '{TRAIN}', local_epochs: 3, learning_rate: 0.5, timeout_s: 120}}
    evaluation: {{holdout: holdout.npz}}
    strategy:
      name: scaffold
      reputation: {{window: 10, flag_at: 2, max_strikes: 2}}
    selection: {{min_sites: 3, deadline_s: 300}}
    contract: contract.json
    sites: [{", ".join(f"{{name: {s}, config: ../sites/{s}/site.yaml}}" for s in SITES)}]
    """
)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_array_federation(
        tmp_path_factory.mktemp("scaffold"),
        FEDERATION,
        SITES,
        package="fr_e2e_scaffold",
        modules={"fit": USER_TRAIN},
        contract=CONTRACT,
        configs={"federation.yaml": FEDERATION_YAML},
        features=6,
    )


@pytest.fixture(scope="module")
def result(federation: Path) -> dict[str, Any]:
    """``fedround run`` as a user runs it."""
    done = run_user_federation(federation, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.result


def test_the_boosting_site_is_clipped_flagged_then_left_out(
    result: dict[str, Any], federation: Path
) -> None:
    reason = "left out: 2 of its last 2 updates were clipped, rejected or discarded"
    left_out = result["sites"]["left_out_in_rounds"]
    assert left_out == {"3": {ATTACKER: reason}}
    assert result["sites"]["flagged"] == {
        ATTACKER: {"strikes": 2, "updates": 2, "past_threshold": True}
    }
    assert [h["sites_accepted"] for h in result["history"]] == [5.0, 5.0, 4.0]
    # MLflow: the run's tag names the flagged site; its strikes per round
    uri = result["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(result["mlflow"]["run_id"])
    assert json.loads(run.data.tags["fedround.flagged_sites"]) == result["sites"]["flagged"]
    strikes = client.get_metric_history(run.info.run_id, f"site.{ATTACKER}.strikes")
    assert [(m.step, m.value) for m in sorted(strikes, key=lambda m: m.step)] == [
        (1, 1.0),
        (2, 2.0),
    ]  # left out of round 3, so not recorded (nor logged) again
    honest = client.get_metric_history(run.info.run_id, "site.site-a.strikes")
    assert {m.value for m in honest} == {0.0}
    # the registered version's lineage report names it
    store = LocalObjectStore(federation / "state" / "objects")
    lineage = build_lineage(uri, store, f"{FEDERATION}-global", result["model"]["version"])
    assert lineage.sites["flagged"] == result["sites"]["flagged"]
    assert (
        f"flagged        {ATTACKER}: 2 of its last 2 updates clipped, rejected or discarded; "
        "past the threshold, left out"
    ) in render_text(lineage)
    assert f"left out       round 3: {ATTACKER}: {reason}" in render_text(lineage)
    resets = client.get_metric_history(run.info.run_id, "site.site-a.scaffold_variate_reset")
    assert sorted((m.step, m.value) for m in resets) == [(1, 1.0), (2, 0.0), (3, 0.0)]


def _scaffold_here(federation: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """SCAFFOLD over the same sites, computed in this process with the same core code:
    (final weights, each site's variate and the round it was computed in)."""
    sys.path.insert(0, str(federation / "user_pkg"))
    try:
        from fr_e2e_scaffold.fit import train  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(federation / "user_pkg"))
    config = load_federation_config(federation / "fed" / "federation.yaml")
    weights = build_model(config.model, seed=config.seed).state_dict()
    strategy = build_strategy(config.strategy, population=len(SITES))
    variates: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
    for round_ in range(1, ROUNDS + 1):
        c = server_control(strategy.state_dict(), weights)
        strategy.begin_round(weights)
        updates = []
        for site in sorted(SITES):
            if site == ATTACKER and round_ > 2:
                continue
            model = build_model(config.model, seed=0)
            load_weights(model, weights, config.model.import_path)
            data = load_dataset(federation / "sites" / site / "train.npz", config.data)
            c_i = variates.get(site, (0, {n: torch.zeros_like(t) for n, t in c.items()}))[1]
            hook = ControlVariate(c, c_i, config.training.learning_rate)
            with hooks_installed(model, [hook]):
                train(model, data, config.training, RoundContext(FEDERATION, "x", site, round_, 0))
            delta = {k: v.detach() - weights[k] for k, v in model.state_dict().items()}
            updates.append((apply_update_hooks([hook], delta), SITES[site]))
            assert hook.updated is not None
            variates[site] = (round_, hook.updated)
        if strategy.needs_preview:
            for update, n in updates:
                strategy.preview(update, n)
        for update, n in updates:
            strategy.accumulate(update, n)
        weights = strategy.finish()
    return weights, {"variates": variates, "state": strategy.state_dict()}


def test_scaffold_state_lives_at_the_sites_and_the_model_is_exact(
    result: dict[str, Any], federation: Path
) -> None:
    expected, here = _scaffold_here(federation)
    store = LocalObjectStore(federation / "state" / "objects")
    final = load_checkpoint(store, FEDERATION, result["run_id"], ROUNDS)
    assert final.manifest.strategy == "scaffold"
    assert final.manifest.sites == sorted(s for s in SITES if s != ATTACKER)
    for name, tensor in final.weights.items():
        assert torch.allclose(tensor, expected[name], atol=1e-5), name
    for name, tensor in final.strategy_state["control"].items():
        assert torch.allclose(tensor, here["state"]["control"][name], atol=1e-5), name
    assert float(sum(t.abs().sum() for t in final.strategy_state["control"].values())) > 0
    # each site's own variate, on its own disk: the last round it trained in, and cᵢ⁺
    for site in SITES:
        kept = SiteState(
            federation / "sites" / site / ".fedround-state", FEDERATION, result["run_id"]
        ).load("control")
        assert kept is not None, site
        round_, variate = here["variates"][site]
        assert int(kept["round"].item()) == round_ == (2 if site == ATTACKER else ROUNDS)
        for name, tensor in variate.items():
            assert torch.allclose(kept[f"after/{name}"], tensor, atol=1e-5), (site, name)
