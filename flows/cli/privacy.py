"""``fedround privacy``: plan a differential-privacy budget before training (registered into
the ``fedround`` app by ``flows/cli/main.py``).

``epsilon`` prints the ε that a plan (noise multiplier σ, sampling rate q, rounds T, δ)
spends; ``calibrate`` the smallest σ that keeps a target ε. The numbers are Google's
``dp_accounting`` library's (:mod:`fedround.tasks.core.privacy.accounting`).

Exit codes: 0 done, 2 an invalid option or an unreachable target (one ``error:`` line
naming the option).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from fedround.tasks.core.privacy import PrivacySpend

privacy_app = typer.Typer(
    help="Plan a differential-privacy budget: the ε a training plan spends, the noise a "
    "target ε needs (DP-FedAvg's subsampled Gaussian mechanism).",
    no_args_is_help=True,
)

# Numbers are taken as text and parsed here, so that a malformed one is reported like any
# other bad value: one `error:` line naming the option, exit code 2.
SamplingRate = Annotated[
    str,
    typer.Option(
        "--sampling-rate",
        metavar="FLOAT",
        help="q: the probability that a participant (site or user) is sampled in a round, "
        "e.g. 0.1 when 10 of 100 take part; 1 when all do.",
    ),
]
Steps = Annotated[
    str,
    typer.Option(
        "--steps", metavar="INTEGER", help="T: the number of rounds (noised aggregations)."
    ),
]
Delta = Annotated[
    str,
    typer.Option(
        "--delta",
        metavar="FLOAT",
        help="δ: the probability that the guarantee fails; well below 1/participants, e.g. 1e-5.",
    ),
]
AccountantOption = Annotated[
    str,
    typer.Option(
        "--accountant",
        metavar="pld|rdp",
        help="pld (privacy loss distributions, tighter) or rdp (Rényi DP, faster, looser).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

EPSILON_MEANING = (
    "meaning: adding or removing any one participant changes the probability of any "
    "outcome of training by at most a factor e^ε, plus δ"
)
SIGMA_MEANING = (
    "meaning: clip each update to norm C and add Gaussian noise of standard deviation σ·C "
    "to their sum, every round"
)


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _option(parameter: str) -> str:
    return "--" + parameter.replace("_", "-")


@contextmanager
def _errors() -> Iterator[None]:
    """An invalid input or an unreachable target: one ``error:`` line naming the option."""
    from fedround.tasks.core.privacy import PrivacyParameterError

    try:
        yield
    except PrivacyParameterError as exc:
        _fail(f"{_option(exc.parameter)} {exc.problem}")


def _number(parameter: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        _fail(f"{_option(parameter)} must be a number (got {text!r})")


def _integer(parameter: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        _fail(f"{_option(parameter)} must be an integer (got {text!r})")


def _quiet_library() -> None:
    # The RDP accountant logs a warning for every order whose series does not converge and
    # drops that order: the bound it returns stays valid (only possibly looser).
    logging.getLogger("absl").setLevel(logging.ERROR)


def _up(value: float, digits: int = 4) -> str:
    """``value`` rounded *up* to ``digits`` significant digits: a printed ε or σ is never
    smaller than the one computed (a bound stays a bound)."""
    if not math.isfinite(value) or value <= 0:
        return f"{value:g}"
    unit = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return _g(float(f"{math.ceil(value / unit - 1e-9) * unit:.{digits}g}"))


def _g(value: float) -> str:
    return f"{value:g}".replace("e-0", "e-").replace("e+0", "e+")


def _plan(spend: PrivacySpend, with_sigma: bool = True) -> str:
    rounds = f"{spend.steps} round{'s' * (spend.steps != 1)}"
    noise = f", σ={_g(spend.noise_multiplier)}" if with_sigma else ""
    accountant = f"{spend.accountant.upper()} accountant"
    return f"{rounds} at q={_g(spend.sampling_rate)}{noise}, δ={_g(spend.delta)} ({accountant})"


@privacy_app.command("epsilon")
def epsilon_command(
    noise_multiplier: Annotated[
        str,
        typer.Option(
            "--noise-multiplier",
            metavar="FLOAT",
            help="σ: the Gaussian noise's standard deviation in units of the clipping norm.",
        ),
    ],
    sampling_rate: SamplingRate,
    steps: Steps,
    delta: Delta,
    accountant: AccountantOption = "pld",
    as_json: AsJson = False,
) -> None:
    """The ε that T rounds of the Poisson-subsampled Gaussian mechanism spend at δ."""
    from fedround.tasks.core.privacy import accountant_named, privacy_spend

    sigma, q, t, d = (
        _number("noise_multiplier", noise_multiplier),
        _number("sampling_rate", sampling_rate),
        _integer("steps", steps),
        _number("delta", delta),
    )
    _quiet_library()
    with _errors():
        spend = privacy_spend(sigma, q, t, d, accountant_named(accountant))
    if as_json:
        typer.echo(json.dumps(spend.as_dict()))
    elif math.isinf(spend.epsilon):
        typer.echo(
            f"ε = inf after {_plan(spend)}: no finite guarantee; add noise or train fewer rounds"
        )
    else:
        typer.echo(f"ε = {_up(spend.epsilon)} after {_plan(spend)}\n{EPSILON_MEANING}")


@privacy_app.command("calibrate")
def calibrate_command(
    target_epsilon: Annotated[
        str,
        typer.Option(
            "--target-epsilon", metavar="FLOAT", help="The ε the whole training may spend."
        ),
    ],
    sampling_rate: SamplingRate,
    steps: Steps,
    delta: Delta,
    accountant: AccountantOption = "pld",
    as_json: AsJson = False,
) -> None:
    """The smallest noise multiplier σ that keeps T rounds within a target ε at δ."""
    from fedround.tasks.core.privacy import accountant_named, calibrate, privacy_spend

    target, q, t, d = (
        _number("target_epsilon", target_epsilon),
        _number("sampling_rate", sampling_rate),
        _integer("steps", steps),
        _number("delta", delta),
    )
    _quiet_library()
    with _errors():
        named = accountant_named(accountant)
        sigma = calibrate(target, q, t, d, named)
        spend = privacy_spend(sigma, q, t, d, named)
    if as_json:
        typer.echo(json.dumps({**spend.as_dict(), "target_epsilon": target}))
        return
    typer.echo(
        f"σ = {_up(sigma)}: the smallest noise multiplier for ε ≤ {_g(target)} after "
        f"{_plan(spend, with_sigma=False)}; ε = {_up(spend.epsilon, 5)} at σ = {_up(sigma, 7)}"
        f"\n{SIGMA_MEANING}"
    )


@privacy_app.command("ledger")
def ledger_command(
    tenant: Annotated[str, typer.Argument(help="The tenant whose privacy ledger to print.")],
    site: Annotated[
        str | None, typer.Option("--site", metavar="SITE", help="A site's ledger instead.")
    ] = None,
    delta: Annotated[
        str, typer.Option("--delta", metavar="FLOAT", help="δ at which to report ε.")
    ] = "1e-5",
    accountant: AccountantOption = "pld",
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            envvar="FEDROUND_STATE_DIR",
            help="Where Prefect, MLflow, the object store and run results live.",
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Print a tenant's (or one site's) privacy-budget ledger, verified: one entry per
    committed round, and the ε all of them spend together.

    Exits 1 if the ledger is missing entries, truncated or tampered with."""
    from fedround.flows import environment
    from fedround.tasks.core.errors import FedroundError
    from fedround.tasks.core.privacy import accountant_named
    from fedround.tasks.core.privacy.ledger import spent_epsilon
    from fedround.tasks.object_store import open_store
    from fedround.tasks.privacy_ledger import PrivacyLedger
    from fedround.tasks.runtime import DEFAULT_STATE_DIR, CoordinatorSettings

    d = _number("delta", delta)
    _quiet_library()
    with _errors():
        named = accountant_named(accountant)
        if not 0 < d < 1:
            from fedround.tasks.core.privacy import PrivacyParameterError

            raise PrivacyParameterError("delta", f"must be in (0, 1) (got {d})")
    environment.configure((state_dir or DEFAULT_STATE_DIR).resolve())
    settings = CoordinatorSettings.from_env()
    ledger = PrivacyLedger(open_store(settings.object_store), tenant, site)
    try:
        entries = ledger.read()
        spent = spent_epsilon((e.mechanism for e in entries), d, named)
    except FedroundError as exc:
        _fail(str(exc), 1)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "tenant": tenant,
                    "site": site,
                    "verified": True,
                    "epsilon": None if math.isinf(spent) else spent,
                    "delta": d,
                    "accountant": named,
                    "entries": [json.loads(e.to_bytes()) for e in entries],
                }
            )
        )
        return
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    typer.echo(
        f"privacy ledger of {ledger.label}: {count} (hash chain verified); "
        f"ε spent = {_up(spent)} at δ={_g(d)} ({named.upper()} accountant)"
    )
    for e in entries:
        typer.echo(
            f"  #{e.sequence:<4} {e.federation} run {e.run_id} round {e.round:<4} {e.mode:<7} "
            f"σ={_g(e.noise_multiplier)} q={_g(e.sampling_rate)} C={_g(e.clip_norm)}"
            f"{f' steps={e.steps}' if e.steps != 1 else ''}  {e.recorded_at}"
        )


def register(app: typer.Typer) -> None:
    app.add_typer(privacy_app, name="privacy")
