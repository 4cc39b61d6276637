"""Privacy accounting: the ε that T rounds of the Poisson-subsampled Gaussian mechanism
spend, and the smallest noise that keeps a target ε.

The mechanism is DP-FedAvg's (McMahan, Ramage, Talwar and Zhang, "Learning Differentially
Private Recurrent Language Models", ICLR 2018): each round takes every participant (a
site, or a user when the guarantee is per user) independently with probability q, clips
each update to L2 norm C and adds N(0, (σC)²) to their sum. σ, the *noise multiplier*, is
the noise's standard deviation in units of C. One round is one
``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` of Google's ``dp_accounting`` library;
T rounds are a ``SelfComposedDpEvent`` of it (:func:`dp_event`). The neighbouring
relation is the library's default, add-or-remove one participant.

Two of the library's accountants turn that event into (ε, δ):

- ``pld`` (the default): privacy loss distributions (Koskela, Jälkö and Honkela, "Computing
  Tight Differential Privacy Guarantees Using FFT", AISTATS 2020; Doroshenko, Ghazi,
  Kamath, Kumar and Manurangsi, "Connect the Dots: Tighter Discrete Approximations of
  Privacy Loss Distributions", PETS 2022), ``dp_accounting.pld.PLDAccountant``. Its
  estimate is pessimistic: an upper bound on the true ε, tight up to the grid the
  privacy loss is discretized on (:data:`PLD_VALUE_DISCRETIZATION`).
- ``rdp``: Rényi DP (Mironov, "Rényi Differential Privacy", CSF 2017; Mironov, Talwar and
  Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019), converted
  to (ε, δ) with Canonne, Kamath and Steinke 2020 (Prop. 12), ``dp_accounting.rdp.
  RdpAccountant``. Also an upper bound, looser than PLD, usually much faster.

Nothing here is an accountant of its own: the numbers are the library's. This module
checks the inputs (each error names the parameter, says what it means and what to do),
picks the bracket for the calibration, and records the result as a :class:`PrivacySpend`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:  # imported where ε is computed: a run without DP never loads it (or scipy)
    import dp_accounting

Accountant = Literal["pld", "rdp"]
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)

PLD_VALUE_DISCRETIZATION = 1e-3
"""The PLD grid, in units of privacy loss. The library's default, 1e-4, took 4-10× the time
on the plans measured when this was chosen (σ 0.3-2, q 0.01-1, up to 10,000 rounds), for
an ε at most 0.25 % smaller (0.1898 against 0.1903 at σ=2, q=0.01, 100 rounds, δ=1e-5).
Both are pessimistic: never below the true ε (the unit tests hold the PLD ε within 1e-4
above the exact one of the Gaussian mechanism)."""

PLD_MIN_NOISE_MULTIPLIER = 0.1
"""Below this σ the PLD grid (and its run time and memory) grows as 1/σ²: measured 1.2 s at
0.1 and 4.5 s at 0.05 for one round. Such noise is no meaningful protection (σ = 0.1, one
round without subsampling: ε ≈ 92 at δ = 1e-5); the RDP accountant still bounds it."""

CALIBRATION_RANGE = (PLD_MIN_NOISE_MULTIPLIER, 1e4)
"""The noise multipliers :func:`calibrate` searches."""

CALIBRATION_RTOL = 1e-4
""":func:`calibrate`'s tolerance, relative: its σ is at most 1e-4·σ above the smallest σ
that meets the target (under the chosen accountant), and never below it."""


class PrivacyParameterError(ConfigError):
    """A privacy-accounting input is invalid, or a target ε cannot be met. ``parameter``
    is the keyword argument's name (the CLI turns it into its option), ``problem`` the
    rest of the message: what was wrong and what to do."""

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter} {problem}")
        self.parameter = parameter
        self.problem = problem


@dataclass(frozen=True, slots=True)
class PrivacySpend:
    """(ε, δ)-DP spent by ``steps`` rounds of the Poisson-subsampled Gaussian mechanism
    with noise multiplier σ and sampling rate q, as ``accountant`` bounds it. ``epsilon``
    is ``math.inf`` when the accountant finds no finite ε at this δ."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sampling_rate: float
    steps: int
    accountant: Accountant

    def __post_init__(self) -> None:
        _check_mechanism(self.noise_multiplier, self.sampling_rate, self.steps, self.delta)
        _check_accountant(self.accountant)
        if math.isnan(self.epsilon) or self.epsilon < 0:
            raise PrivacyParameterError("epsilon", f"must be >= 0 or inf (got {self.epsilon})")

    def as_dict(self) -> dict[str, float | int | str | None]:
        """The record as JSON-safe values (an infinite ε is ``None``)."""
        record: dict[str, float | int | str | None] = dict(asdict(self))
        if math.isinf(self.epsilon):
            record["epsilon"] = None
        return record


def dp_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event of ``steps`` rounds, each Poisson-sampling participants
    with probability ``sampling_rate`` and adding Gaussian noise of ``noise_multiplier``."""
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        steps,
    )


def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "pld",
) -> float:
    """ε of ``steps`` rounds of the Poisson-subsampled Gaussian mechanism at ``delta``, as
    the ``accountant`` (``pld``, tighter, or ``rdp``) of ``dp_accounting`` bounds it.

    ``math.inf`` when there is no finite bound at this δ (the PLD accountant gives up
    beyond ε ≈ 700, where its arithmetic overflows). Raises :class:`PrivacyParameterError`
    on an invalid input.
    """
    _check_mechanism(noise_multiplier, sampling_rate, steps, delta)
    _check_accountant(accountant)
    if accountant == "pld":
        _check_pld_noise(noise_multiplier)
    return _epsilon(
        float(noise_multiplier), float(sampling_rate), int(steps), float(delta), accountant
    )


def privacy_spend(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "pld",
) -> PrivacySpend:
    """:func:`epsilon`, as the record kept per round or model."""
    return PrivacySpend(
        epsilon=epsilon(noise_multiplier, sampling_rate, steps, delta, accountant),
        delta=float(delta),
        noise_multiplier=float(noise_multiplier),
        sampling_rate=float(sampling_rate),
        steps=int(steps),
        accountant=accountant,
    )


def calibrate(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "pld",
) -> float:
    """The smallest noise multiplier σ for which ``steps`` rounds at ``sampling_rate`` spend
    at most ``target_epsilon`` at ``delta``, under ``accountant``.

    The bracket is found by doubling or halving σ from 1 within :data:`CALIBRATION_RANGE`;
    ``dp_accounting.calibrate_dp_mechanism`` (Brent's method, with a bisection fallback)
    then narrows it to :data:`CALIBRATION_RTOL`. The library guarantees ε(σ) ≤ target for
    the σ it returns. Raises :class:`PrivacyParameterError` on an invalid input, or when
    the target cannot be met within the range (saying why).
    """
    _check_positive("target_epsilon", target_epsilon, "ε = 0 would need infinite noise")
    _check_plan(sampling_rate, steps, delta)
    _check_accountant(accountant)
    target = float(target_epsilon)
    q, t, delta = float(sampling_rate), int(steps), float(delta)
    sampled = _sampled_at_all(q, t)
    if sampled <= delta:
        raise PrivacyParameterError(
            "sampling_rate",
            f"{q:g} over {t} step{'s' * (t != 1)} samples a participant at all with "
            f"probability 1-(1-q)^T={sampled:.3g} <= δ={delta:g}: (0, δ)-DP holds with no "
            "noise, so there is nothing to calibrate. Take δ well below that (and below "
            "1/participants), or sample more participants per round.",
        )
    low_end, high_end = CALIBRATION_RANGE

    def spent(sigma: float) -> float:
        return _epsilon(sigma, q, t, delta, accountant)

    def setting() -> str:
        return f"q={q:g}, {t} step{'s' * (t != 1)}, δ={delta:g}, {accountant.upper()} accountant"

    sigma = 1.0
    if spent(sigma) <= target:  # halve until the noise is too little
        high = sigma
        while True:
            sigma = max(sigma / 2, low_end)
            spent_here = spent(sigma)
            if spent_here > target:
                low = sigma
                break
            high = sigma
            if sigma == low_end:
                raise PrivacyParameterError(
                    "target_epsilon",
                    f"{target:g} is met by every noise multiplier down to σ={low_end:g} "
                    f"(ε={spent_here:.4g} there; {setting()}): the smallest σ is below the "
                    f"range this planner searches, so σ={low_end:g} meets the target. "
                    f"{_little_noise_reason(target, sampled)}",
                )
    else:  # double until the noise is enough
        low = sigma
        while True:
            sigma = min(sigma * 2, high_end)
            spent_here = spent(sigma)
            if spent_here <= target:
                high = sigma
                break
            low = sigma
            if sigma == high_end:
                raise PrivacyParameterError(
                    "target_epsilon",
                    f"{target:g} cannot be reached: even σ={high_end:g} gives "
                    f"ε={spent_here:.4g} ({setting()}). {_floor_reason(accountant)}",
                )
    import dp_accounting

    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant),
            lambda sigma: dp_event(sigma, q, t),
            target,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(low, high),
            tol=CALIBRATION_RTOL * low,
        )
    )


def _epsilon(sigma: float, q: float, steps: int, delta: float, accountant: Accountant) -> float:
    ledger = _accountant(accountant).compose(dp_event(sigma, q, steps))
    # Past ε ≈ 700 the PLD's exp(-loss) underflows and the library's ratio overflows to
    # inf, which is its answer ("no finite ε"): not worth a warning.
    with np.errstate(over="ignore", divide="ignore"):
        return float(ledger.get_epsilon(delta))


def _accountant(name: Accountant) -> dp_accounting.PrivacyAccountant:
    from dp_accounting import pld, rdp

    if name == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    return rdp.RdpAccountant()


def _sampled_at_all(q: float, steps: int) -> float:
    """The probability that a participant is sampled in at least one of ``steps`` rounds."""
    return -math.expm1(steps * math.log1p(-q)) if q < 1 else 1.0


def _little_noise_reason(target: float, sampled: float) -> str:
    if target >= 10:
        return "ε this large protects little: ask for a smaller target."
    return (
        f"A participant is sampled at all with probability {sampled:.3g} only, so little "
        "noise is needed; check the sampling rate and the number of rounds."
    )


def _floor_reason(accountant: Accountant) -> str:
    if accountant == "pld":
        return (
            f"The PLD accountant's grid of {PLD_VALUE_DISCRETIZATION:g} in privacy loss "
            "bounds how small an ε it certifies (rounding is pessimistic). Ask for a larger "
            "target, or a larger δ."
        )
    return (
        "The RDP accountant's conversion to (ε, δ) costs about log(1/δ)/(α−1) at its "
        "largest order α, however much noise is added. Ask for a larger target, a larger δ, "
        "or use the PLD accountant."
    )


def _check_positive(name: str, value: float, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PrivacyParameterError(name, f"must be a number (got {value!r})")
    if not math.isfinite(value) or value <= 0:
        raise PrivacyParameterError(name, f"must be a finite number > 0 (got {value}): {meaning}")


def _check_mechanism(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float
) -> None:
    _check_positive(
        "noise_multiplier",
        noise_multiplier,
        "it is the Gaussian noise's standard deviation in units of the clipping norm; "
        "0 would be no noise and no privacy",
    )
    _check_plan(sampling_rate, steps, delta)


def _check_plan(sampling_rate: float, steps: int, delta: float) -> None:
    meaning_q = (
        "the probability that a participant (site or user) is sampled in a round, "
        "e.g. 0.1 when 10 of 100 take part; 1 when all do"
    )
    _check_positive("sampling_rate", sampling_rate, meaning_q)
    if sampling_rate > 1:
        raise PrivacyParameterError(
            "sampling_rate", f"must be in (0, 1] (got {sampling_rate}): {meaning_q}"
        )
    meaning_delta = (
        "the probability that the ε guarantee fails; take it well below 1/N for N "
        "participants, e.g. 1e-5"
    )
    _check_positive("delta", delta, meaning_delta)
    if delta >= 1:
        raise PrivacyParameterError("delta", f"must be in (0, 1) (got {delta}): {meaning_delta}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise PrivacyParameterError(
            "steps",
            f"must be an integer >= 1 (got {steps!r}): the number of rounds, each one "
            "noised aggregation",
        )


def accountant_named(name: str) -> Accountant:
    """``name`` as an :data:`Accountant` (e.g. a command-line option), or
    :class:`PrivacyParameterError`."""
    if name == "pld":
        return "pld"
    if name == "rdp":
        return "rdp"
    _check_accountant(name)
    raise AssertionError(name)  # unreachable: _check_accountant refused it


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyParameterError(
            "accountant",
            f"must be 'pld' (privacy loss distributions, tighter) or 'rdp' (Rényi DP, "
            f"faster) (got {accountant!r})",
        )


def _check_pld_noise(noise_multiplier: float) -> None:
    if noise_multiplier < PLD_MIN_NOISE_MULTIPLIER:
        raise PrivacyParameterError(
            "noise_multiplier",
            f"{noise_multiplier:g} is below {PLD_MIN_NOISE_MULTIPLIER:g}, where the PLD "
            "accountant's grid and run time grow as 1/σ² and ε is far beyond any "
            "useful guarantee (σ=0.1, one round, q=1: ε≈92 at δ=1e-5). Use the RDP "
            "accountant for an upper bound.",
        )
