"""Privacy accounting (tasks/core/privacy) and ``fedround privacy``: golden values from the
exact ε of the Gaussian and the once-subsampled Gaussian mechanisms (computed here from
their closed forms with scipy, independently of dp_accounting), monotonicity, PLD ≤ RDP,
calibration round trips, every refused input, and the real command line."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.privacy import (
    PrivacyParameterError,
    PrivacySpend,
    accountant_named,
    calibrate,
    epsilon,
    privacy_spend,
)
from fedround.tasks.core.privacy.accounting import CALIBRATION_RTOL

DELTA = 1e-5


def gaussian_delta(eps: float, sigma: float) -> float:
    """δ(ε) of the Gaussian mechanism with sensitivity 1 and standard deviation σ: Balle
    and Wang, "Improving the Gaussian Mechanism for Differential Privacy: Analytical
    Calibration and Optimal Denoising", ICML 2018, Theorem 8."""
    return float(
        norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma)
    )


def subsampled_gaussian_delta(eps: float, sigma: float, q: float) -> float:
    """δ(ε) of one round of the Poisson-subsampled Gaussian mechanism, add-or-remove one:
    the larger hockey-stick divergence H_{e^ε} of Q = (1-q)·N(0,σ²) + q·N(1,σ²) against
    P = N(0,σ²), in either order. Q/P grows with x, so each divergence is a Gaussian tail
    beyond the point where the densities' ratio is e^ε."""
    a = math.exp(eps)
    remove = add = 0.0
    if a > 1 - q:  # H_a(Q || P): x beyond q(x) = a p(x)
        x = sigma**2 * math.log((a - (1 - q)) / q) + 0.5
        remove = (
            (1 - q) * norm.sf(x / sigma) + q * norm.sf((x - 1) / sigma) - a * norm.sf(x / sigma)
        )
    if 1 / a > 1 - q:  # H_a(P || Q): x below p(x) = a q(x)
        x = sigma**2 * math.log((1 / a - (1 - q)) / q) + 0.5
        add = norm.cdf(x / sigma) - a * (
            (1 - q) * norm.cdf(x / sigma) + q * norm.cdf((x - 1) / sigma)
        )
    return max(remove, add)


def exact_epsilon(delta_of_eps: Callable[[float], float], delta: float) -> float:
    """The ε at which ``delta_of_eps`` (decreasing) equals ``delta``, by Brent's method."""
    return float(brentq(lambda eps: delta_of_eps(eps) - delta, 0.0, 500.0, xtol=1e-12))


# --- golden values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma", "steps"), [(0.5, 1), (1.0, 1), (2.0, 1), (5.0, 1), (1.0, 4), (3.0, 10), (10.0, 100)]
)
def test_without_subsampling_pld_is_the_exact_gaussian_epsilon_and_rdp_bounds_it(
    sigma: float, steps: int
) -> None:
    # T rounds of N(0, σ²) at q = 1 are one Gaussian mechanism with σ/√T.
    exact = exact_epsilon(lambda eps: gaussian_delta(eps, sigma / math.sqrt(steps)), DELTA)

    pld = epsilon(sigma, 1.0, steps, DELTA, "pld")
    rdp = epsilon(sigma, 1.0, steps, DELTA, "rdp")

    assert exact - 1e-9 <= pld <= exact + 1e-4  # pessimistic, and tight up to its grid
    assert rdp >= exact


def test_golden_value_sigma_one() -> None:
    # σ = 1, δ = 1e-5: ε = 4.37718 (Balle and Wang's analytical Gaussian mechanism).
    assert epsilon(1.0, 1.0, 1, DELTA) == pytest.approx(4.377178, abs=1e-5)
    assert epsilon(1.0, 1.0, 1, DELTA, "rdp") == pytest.approx(4.728507, abs=1e-5)


@pytest.mark.parametrize(
    ("sigma", "q", "delta"),
    [(1.0, 0.1, 1e-5), (1.0, 0.1, 1e-3), (0.8, 0.01, 1e-5), (0.8, 0.01, 1e-3), (2.0, 0.5, 1e-5)],
)
def test_one_subsampled_round_pld_is_the_exact_epsilon_and_rdp_bounds_it(
    sigma: float, q: float, delta: float
) -> None:
    exact = exact_epsilon(lambda eps: subsampled_gaussian_delta(eps, sigma, q), delta)

    pld = epsilon(sigma, q, 1, delta, "pld")
    rdp = epsilon(sigma, q, 1, delta, "rdp")

    assert exact - 1e-9 <= pld <= exact + 1e-4
    assert rdp >= exact


# --- properties ----------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_falls_with_noise_and_grows_with_rounds_and_sampling(accountant: str) -> None:
    name = accountant_named(accountant)

    by_noise = [epsilon(sigma, 0.1, 50, DELTA, name) for sigma in (0.7, 1.0, 2.0, 5.0)]
    by_steps = [epsilon(1.5, 0.1, steps, DELTA, name) for steps in (1, 10, 100, 1000)]
    by_rate = [epsilon(1.5, q, 50, DELTA, name) for q in (0.001, 0.01, 0.1, 1.0)]

    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == len(by_noise)
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == len(by_steps)
    assert by_rate == sorted(by_rate) and len(set(by_rate)) == len(by_rate)


@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(0.7, 0.1, 50), (1.1, 0.1, 1000), (4.0, 0.01, 10000), (2.0, 1.0, 3)]
)
def test_pld_is_never_looser_than_rdp(sigma: float, q: float, steps: int) -> None:
    assert epsilon(sigma, q, steps, DELTA, "pld") <= epsilon(sigma, q, steps, DELTA, "rdp")


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "accountant"),
    [(1.5, 1.0, 1, "pld"), (2.0, 0.1, 100, "pld"), (1.2, 1.0, 100, "rdp"), (3.0, 1.0, 10, "pld")],
)
def test_calibrate_inverts_epsilon(sigma: float, q: float, steps: int, accountant: str) -> None:
    name = accountant_named(accountant)
    spent = epsilon(sigma, q, steps, DELTA, name)

    found = calibrate(spent, q, steps, DELTA, name)

    # The smallest σ with ε(σ) ≤ ε(sigma) is sigma itself; calibrate may overshoot by its
    # tolerance, never undershoot (beyond the PLD grid's wobble).
    assert -1e-6 <= (found - sigma) / sigma <= CALIBRATION_RTOL + 1e-6
    assert epsilon(found, q, steps, DELTA, name) <= spent


def test_calibrate_gives_the_smallest_noise_that_meets_the_target() -> None:
    sigma = calibrate(8.0, 0.1, 1000, DELTA)

    assert sigma == pytest.approx(2.0510, abs=1e-3)
    assert epsilon(sigma, 0.1, 1000, DELTA) <= 8.0
    assert epsilon(sigma * (1 - 1e-3), 0.1, 1000, DELTA) > 8.0


def test_pld_epsilon_is_infinite_when_no_finite_bound_exists() -> None:
    spend = privacy_spend(1.1, 0.1, 100_000, DELTA)

    assert math.isinf(spend.epsilon)
    assert spend.as_dict()["epsilon"] is None
    assert math.isfinite(epsilon(1.1, 0.1, 100_000, DELTA, "rdp"))  # ~1167: a bound, useless


# --- the record ----------------------------------------------------------------------------


def test_privacy_spend_is_a_frozen_json_record() -> None:
    spend = privacy_spend(1.0, 1.0, 1, DELTA, "rdp")

    assert spend == PrivacySpend(
        epsilon=epsilon(1.0, 1.0, 1, DELTA, "rdp"),
        delta=DELTA,
        noise_multiplier=1.0,
        sampling_rate=1.0,
        steps=1,
        accountant="rdp",
    )
    assert json.loads(json.dumps(spend.as_dict())) == {
        "epsilon": spend.epsilon,
        "delta": DELTA,
        "noise_multiplier": 1.0,
        "sampling_rate": 1.0,
        "steps": 1,
        "accountant": "rdp",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        spend.epsilon = 0.0  # type: ignore[misc]
    with pytest.raises(PrivacyParameterError, match="epsilon must be >= 0"):
        PrivacySpend(-1.0, DELTA, 1.0, 1.0, 1, "pld")
    with pytest.raises(PrivacyParameterError, match="sampling_rate must be in"):
        PrivacySpend(1.0, DELTA, 1.0, 2.0, 1, "pld")


# --- refused inputs ------------------------------------------------------------------------

GOOD = {"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10, "delta": DELTA}


@pytest.mark.parametrize(
    ("change", "parameter", "message"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier", "must be a finite number > 0 (got 0.0)"),
        ({"noise_multiplier": -1.0}, "noise_multiplier", "no noise and no privacy"),
        ({"noise_multiplier": math.nan}, "noise_multiplier", "finite number > 0 (got nan)"),
        ({"noise_multiplier": math.inf}, "noise_multiplier", "finite number > 0 (got inf)"),
        ({"noise_multiplier": "1"}, "noise_multiplier", "must be a number (got '1')"),
        ({"noise_multiplier": 0.05}, "noise_multiplier", "Use the RDP accountant"),
        ({"sampling_rate": 0.0}, "sampling_rate", "finite number > 0 (got 0.0)"),
        ({"sampling_rate": 1.5}, "sampling_rate", "must be in (0, 1] (got 1.5)"),
        ({"sampling_rate": math.nan}, "sampling_rate", "(got nan)"),
        ({"delta": 0.0}, "delta", "e.g. 1e-5"),
        ({"delta": 1.0}, "delta", "must be in (0, 1) (got 1.0)"),
        ({"delta": math.inf}, "delta", "(got inf)"),
        ({"steps": 0}, "steps", "must be an integer >= 1 (got 0)"),
        ({"steps": 10.0}, "steps", "integer >= 1 (got 10.0)"),
        ({"steps": True}, "steps", "(got True)"),
        ({"accountant": "moments"}, "accountant", "must be 'pld' (privacy loss"),
    ],
)
def test_epsilon_refuses_bad_input_naming_the_parameter(
    change: dict[str, object], parameter: str, message: str
) -> None:
    with pytest.raises(PrivacyParameterError) as caught:
        epsilon(**{**GOOD, **change})  # type: ignore[arg-type]

    assert caught.value.parameter == parameter
    assert str(caught.value).startswith(f"{parameter} ")
    assert message in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_rdp_takes_little_noise_that_pld_refuses() -> None:
    assert epsilon(0.05, 1.0, 1, DELTA, "rdp") > 250


@pytest.mark.parametrize(
    ("target", "q", "steps", "accountant", "message"),
    [
        (0.0, 0.1, 10, "pld", "ε = 0 would need infinite noise"),
        (-1.0, 0.1, 10, "pld", "finite number > 0 (got -1.0)"),
        (math.inf, 0.1, 10, "pld", "(got inf)"),
        (1e-4, 1.0, 1, "pld", "cannot be reached: even σ=10000 gives ε=0.0007"),
        (1e-4, 1.0, 1, "pld", "PLD accountant's grid of 0.001"),
        (1e-3, 1.0, 1, "rdp", "cannot be reached: even σ=10000 gives ε=0.0035"),
        (1e-3, 1.0, 1, "rdp", "log(1/δ)/(α−1) at its largest order"),
        (500.0, 1.0, 1, "rdp", "met by every noise multiplier down to σ=0.1"),
        (500.0, 1.0, 1, "rdp", "ε this large protects little"),
        (1.0, 0.1, 10, "laplace", "must be 'pld'"),
    ],
)
def test_calibrate_refuses_bad_or_unreachable_targets_saying_why(
    target: float, q: float, steps: int, accountant: str, message: str
) -> None:
    with pytest.raises(PrivacyParameterError) as caught:
        calibrate(target, q, steps, 1e-5, accountant)  # type: ignore[arg-type]

    assert caught.value.parameter in ("target_epsilon", "accountant")
    assert message in str(caught.value)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibrate_refuses_a_plan_that_needs_no_noise(accountant: str) -> None:
    # 10 rounds at q = 1e-7 sample a participant at all with probability 1e-6 < δ: (0, δ)-DP
    # holds without noise, whatever the accountant would say.
    with pytest.raises(PrivacyParameterError) as caught:
        calibrate(1.0, 1e-7, 10, DELTA, accountant_named(accountant))

    assert caught.value.parameter == "sampling_rate"
    assert "probability 1-(1-q)^T=1e-06 <= δ=1e-05: (0, δ)-DP holds with no noise" in str(
        caught.value
    )


def test_calibrate_checks_the_plan_too() -> None:
    with pytest.raises(PrivacyParameterError, match=r"^sampling_rate must be in \(0, 1\]"):
        calibrate(1.0, 2.0, 10, DELTA)
    with pytest.raises(PrivacyParameterError, match=r"^steps must be an integer"):
        calibrate(1.0, 0.1, 0, DELTA)
    with pytest.raises(PrivacyParameterError, match=r"^delta must be in \(0, 1\)"):
        calibrate(1.0, 0.1, 10, 1.5)


# --- the command line ----------------------------------------------------------------------

FEDROUND = str(Path(sys.executable).with_name("fedround"))


def run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDROUND, "privacy", *args],
        env={"PATH": str(Path(sys.executable).parent), "FEDROUND_STATE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_prints_epsilon_as_json(tmp_path: Path) -> None:
    done = run_cli(
        "epsilon",
        *("--noise-multiplier", "1.1", "--sampling-rate", "0.1", "--steps", "1000"),
        *("--delta", "1e-5", "--accountant", "rdp", "--json"),
        tmp_path=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "epsilon": epsilon(1.1, 0.1, 1000, DELTA, "rdp"),
        "delta": DELTA,
        "noise_multiplier": 1.1,
        "sampling_rate": 0.1,
        "steps": 1000,
        "accountant": "rdp",
    }


def test_cli_reports_bad_input_on_one_line_with_exit_code_2(tmp_path: Path) -> None:
    done = run_cli(
        "calibrate",
        *("--target-epsilon", "2", "--sampling-rate", "1.5", "--steps", "10", "--delta", "1e-5"),
        tmp_path=tmp_path,
    )

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("error: --sampling-rate must be in (0, 1] (got 1.5)")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
