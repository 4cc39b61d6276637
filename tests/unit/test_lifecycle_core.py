"""Pure lifecycle math: semantic-version bumps and promotion gates (exact, milliseconds)."""

from __future__ import annotations

import pytest

from fedround.tasks.core.config import PromotionConfig, parse_federation_config
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.gates import (
    GLOBAL_GAIN,
    QUORUM,
    SITE_FLOOR,
    SITE_REGRESSION,
    SiteMetric,
    decide,
)
from fedround.tasks.core.semver import Change, SemVer, bump, classify, next_version

V = SemVer.parse
ARCH = {"architecture": "mnist_cnn", "conv1": 16, "conv2": 32, "hidden": 64}


# --- semantic versions ---------------------------------------------------------------


def test_parse_and_order() -> None:
    assert V("1.10.0") > V("1.9.3")
    assert str(V("2.0.1")) == "2.0.1"
    with pytest.raises(ValueError, match="not a semantic version"):
        V("1.2")
    with pytest.raises(ValueError, match="not a semantic version"):
        V("01.2.3")


def test_first_version_is_1_0_0() -> None:
    assert bump([], ARCH, None, fine_tuned=False).version == V("1.0.0")
    assert bump([], ARCH, None, fine_tuned=False).change is Change.FIRST


@pytest.mark.parametrize(
    ("existing", "reference", "change", "expected"),
    [
        (["1.0.0"], "1.0.0", Change.MINOR, "1.1.0"),
        (["1.0.0", "1.1.0", "1.2.0"], "1.1.0", Change.MINOR, "1.3.0"),  # next free minor
        (["1.0.0", "2.0.0"], "1.0.0", Change.MINOR, "1.1.0"),  # stays in its major line
        (["1.0.0", "1.1.0", "2.0.0"], "1.1.0", Change.MAJOR, "3.0.0"),
        (["1.2.0"], "1.2.0", Change.PATCH, "1.2.1"),
        (["1.2.0", "1.2.1", "1.2.2", "1.3.0"], "1.2.1", Change.PATCH, "1.2.3"),
        (["1.0.0"], None, Change.FIRST, "2.0.0"),  # versions exist but none to compare with
    ],
)
def test_next_version(
    existing: list[str], reference: str | None, change: Change, expected: str
) -> None:
    ref = V(reference) if reference else None
    assert next_version([V(v) for v in existing], ref, change) == V(expected)


def test_classify_major_minor_patch() -> None:
    wider = {**ARCH, "conv1": 32}
    change, reason = classify(wider, ARCH, fine_tuned=False)
    assert change is Change.MAJOR
    assert reason == "architecture changed: conv1 16→32"
    assert classify(ARCH, ARCH, fine_tuned=False)[0] is Change.MINOR
    assert classify(ARCH, ARCH, fine_tuned=True)[0] is Change.PATCH
    # an architecture change dominates fine-tuning
    assert classify(wider, ARCH, fine_tuned=True)[0] is Change.MAJOR


def test_bump_uses_reference() -> None:
    existing = [V("1.0.0"), V("1.1.0")]
    retrained = bump(existing, ARCH, (V("1.1.0"), ARCH), fine_tuned=False)
    assert (retrained.version, retrained.change) == (V("1.2.0"), Change.MINOR)
    tuned = bump(existing, ARCH, (V("1.0.0"), ARCH), fine_tuned=True)
    assert tuned.version == V("1.0.1")
    wider = bump(existing, {**ARCH, "hidden": 128}, (V("1.1.0"), ARCH), fine_tuned=False)
    assert wider.version == V("2.0.0")


# --- gates ---------------------------------------------------------------------------

POLICY = PromotionConfig(min_gain=0.01, max_site_drop=0.02, site_floor=0.80)
ACCURACY = {"metric": "accuracy", "direction": "higher"}


def metrics(**values: tuple[float, int]) -> dict[str, SiteMetric]:
    return {site.replace("_", "-"): SiteMetric(v, n) for site, (v, n) in values.items()}


def test_all_gates_pass_with_exact_figures() -> None:
    production = metrics(a=(0.90, 100), b=(0.80, 300))
    candidate = metrics(a=(0.91, 100), b=(0.82, 300))
    decision = decide(candidate, production, POLICY, min_sites=2, **ACCURACY)
    assert decision.passed and not decision.first_production
    assert decision.global_production == pytest.approx((90 + 240) / 400)
    assert decision.global_candidate == pytest.approx((91 + 246) / 400)
    assert [g.gate for g in decision.gates] == [QUORUM, GLOBAL_GAIN, SITE_REGRESSION, SITE_FLOOR]
    assert decision.sites["b"]["change"] == pytest.approx(0.02)


def test_global_gain_gate_fails_below_delta() -> None:
    production = metrics(a=(0.90, 100), b=(0.90, 100))
    candidate = metrics(a=(0.905, 100), b=(0.905, 100))  # +0.005 < δ = 0.01
    decision = decide(candidate, production, POLICY, min_sites=2, **ACCURACY)
    assert not decision.passed
    assert decision.failed == [GLOBAL_GAIN]
    assert "gain +0.0050, at least +0.0100 required" in decision.summary()


def test_gain_exactly_delta_passes_despite_float_rounding() -> None:
    production = metrics(a=(0.91, 1))
    candidate = metrics(a=(0.92, 1))  # 0.92 - 0.91 = 0.010000000000000009 or 0.00999…
    assert decide(candidate, production, POLICY, min_sites=1, **ACCURACY).passed


def test_one_site_regressing_more_than_epsilon_fails() -> None:
    production = metrics(a=(0.80, 100), b=(0.90, 900))
    candidate = metrics(a=(0.77, 100), b=(0.95, 900))  # global improves, site a drops 0.03
    decision = decide(candidate, production, POLICY, min_sites=2, **ACCURACY)
    assert decision.failed == [SITE_REGRESSION, SITE_FLOOR]
    assert "a 0.7700 vs 0.8000" in decision.summary()


def test_floor_and_quorum() -> None:
    candidate = metrics(a=(0.79, 100))
    decision = decide(
        candidate, None, POLICY, min_sites=2, unavailable={"b": "timed out"}, **ACCURACY
    )
    assert decision.first_production
    assert decision.failed == [QUORUM, SITE_FLOOR]
    assert decision.unavailable == {"b": "timed out"}


def test_first_production_only_needs_quorum_and_floor() -> None:
    decision = decide(metrics(a=(0.85, 10), b=(0.95, 10)), None, POLICY, min_sites=2, **ACCURACY)
    assert decision.passed and decision.first_production
    assert [g.gate for g in decision.gates] == [QUORUM, SITE_FLOOR]
    assert decision.summary().startswith("first production model")


def test_loss_metric_is_lower_is_better() -> None:
    policy = PromotionConfig(metric="loss", min_gain=0.05, max_site_drop=0.1, site_floor=0.5)
    lower = {"metric": "loss", "direction": "lower"}
    production = metrics(a=(0.40, 10), b=(0.40, 10))
    better = metrics(a=(0.30, 10), b=(0.34, 10))
    assert decide(better, production, policy, min_sites=2, **lower).passed
    worse_site = metrics(a=(0.10, 10), b=(0.52, 10))  # b's loss rose 0.12 > ε, above ceiling
    assert decide(worse_site, production, policy, min_sites=2, **lower).failed == [
        SITE_REGRESSION,
        SITE_FLOOR,
    ]


def test_any_named_metric_gates_in_its_configured_direction() -> None:
    """A regression federation promotes on mae (lower is better), named by
    evaluation.metric; promotion.metric unset falls back to it."""
    config = parse_federation_config(
        "federation: f\ncontract: c.json\nsites: [{name: a}, {name: b}]\n"
        "evaluation: {metric: mae}\n"
        "promotion: {min_gain: 0.1, max_site_drop: 0.05, site_floor: 2.0}\n"
    )
    assert (config.promotion_metric, config.metric_direction()) == ("mae", "lower")
    gate = {"metric": config.promotion_metric, "direction": config.metric_direction()}
    production = metrics(a=(1.50, 100), b=(1.80, 300))
    candidate = metrics(a=(1.40, 100), b=(1.60, 300))  # global mae 1.725 → 1.55: gain 0.175
    decision = decide(candidate, production, config.promotion, min_sites=2, **gate)
    assert decision.passed, decision.summary()
    assert (decision.metric, decision.direction) == ("mae", "lower")
    assert decision.global_candidate == pytest.approx(1.55)
    assert "gain +0.1750" in decision.summary()
    # a candidate with a *higher* mae is worse, although the number grew
    worse = metrics(a=(1.60, 100), b=(1.90, 300))
    assert decide(worse, production, config.promotion, min_sites=2, **gate).failed == [
        GLOBAL_GAIN,
        SITE_REGRESSION,
    ]
    # the floor is a ceiling for a lower-is-better metric: site b at 2.1 > 2.0 fails it
    ceiling = metrics(a=(1.0, 100), b=(2.1, 10))
    assert SITE_FLOOR in decide(ceiling, None, config.promotion, min_sites=2, **gate).failed
    # promotion.metric overrides evaluation.metric; a metric of your own needs a direction
    own = parse_federation_config(
        "federation: f\ncontract: c.json\nsites: [{name: a}]\n"
        "evaluation: {metric: mae, directions: {pinball: lower}}\n"
        "promotion: {metric: pinball}\n"
    )
    assert (own.promotion_metric, own.metric_direction()) == ("pinball", "lower")
    with pytest.raises(ValueError, match="direction must be"):
        decide(candidate, production, config.promotion, min_sites=2, metric="x", direction="up")


def test_only_sites_evaluating_both_models_are_compared() -> None:
    production = metrics(a=(0.9, 10))
    candidate = metrics(a=(0.95, 10), b=(0.5, 1000))  # b has no production figure
    decision = decide(candidate, production, PromotionConfig(), min_sites=1, **ACCURACY)
    assert decision.global_candidate == pytest.approx(0.95)
    assert decision.passed


def test_canary_sites_must_be_federation_sites() -> None:
    text = (
        "federation: f\ncontract: c.json\nsites: [{name: a}, {name: b}]\n"
        "promotion: {rollout: {canary: [a, zz]}}\n"
    )
    with pytest.raises(ConfigError, match=r"canary names sites that are not in sites: \['zz'\]"):
        parse_federation_config(text)
    ok = parse_federation_config(text.replace(", zz", ""))
    assert ok.promotion.rollout.canary == ["a"]
    assert ok.promotion.max_site_drop == 0.02


# --- cost accounting, plots, federation context ---------------------------------------


def test_costs_sum_per_site_and_tenant_exactly() -> None:
    from fedround.tasks.core.costs import summarize

    report = summarize(
        {
            "a": {"seconds": [1.5, 2.5], "bytes_up": [100, 100], "bytes_down": [200, 200]},
            "b": {"seconds": [4.0], "bytes_up": [50], "bytes_down": [200]},
        },
        tenant="acme",
        coordinator_seconds=9.0,
    )
    assert report.tenant_total.compute_seconds == 8.0
    metrics = report.metrics()
    assert metrics["cost.site.a.compute_seconds"] == 4.0
    assert metrics["cost.site.b.bytes_up"] == 50
    assert metrics["cost.tenant.acme.bytes_up"] == 250
    assert metrics["cost.tenant.acme.bytes_down"] == 600
    assert metrics["cost.coordinator.seconds"] == 9.0
    assert report.to_dict()["sites"]["a"]["rounds"] == 2


def test_training_plots_are_pngs_per_metric() -> None:
    from fedround.tasks.plots import training_plots

    pngs = training_plots(
        {"accuracy": [(1, 0.5), (2, 0.7)], "loss": [(1, 1.2), (2, 0.8)]},
        {"a": {"train_accuracy": [(1, 0.4), (2, 0.6)], "train_loss": [(1, 1.5), (2, 1.0)]}},
    )
    assert sorted(pngs) == ["accuracy.png", "loss.png"]
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs.values())
    assert training_plots({}, {}) == {}


def test_federation_context_sets_and_restores_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    from fedround.tasks import run_context

    for name in run_context.ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert run_context.mlflow_tags() == {}
    with run_context.federation_context(federation="f", tenant="t", run_id="r1"):
        run_context.update(round=3)
        assert os.environ["FEDROUND_ROUND"] == "3"
        with run_context.federation_context(site="a"):
            assert run_context.current_fields() == {
                "federation": "f",
                "tenant": "t",
                "run_id": "r1",
                "round": "3",
                "site": "a",
            }
        assert "FEDROUND_SITE" not in os.environ
    assert not [n for n in run_context.ENV.values() if n in os.environ]
    with (
        pytest.raises(run_context.BrokenContext, match="round must be a whole number"),
        run_context.federation_context(round="x"),
    ):
        pass
