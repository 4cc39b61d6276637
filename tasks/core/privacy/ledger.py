"""The privacy-budget ledger, pure parts: entries, their hash chain, and the ε they spend.

A ledger is a list of :class:`LedgerEntry`, one per committed round that spent privacy
against its *scope*: the tenant (every round of every federation of the tenant), or one
site (the rounds in which that site's data was at risk). Each entry carries the
mechanism's parameters, not an ε: the cumulative spend is recomputed by composing every
entry's ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` with the accountant
(:func:`spent_epsilon`), which is tighter than summing per-run ε's and stays correct
when runs use different σ or q.

Entries are keyed by (run, round): recording a round twice (a resumed run) is a no-op.
Each entry carries the SHA-256 of the entry before it and a *head* names the newest
entry's sequence number and digest, so a removed, reordered, edited or truncated ledger
fails :func:`verify_chain` with :class:`LedgerIntegrityError`, never reads as a shorter
(cheaper) history. The I/O lives in :mod:`fedround.tasks.privacy_ledger`.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import FedroundError
from .accounting import Accountant, _accountant

GENESIS = "0" * 64
"""``previous_sha256`` of a ledger's first entry."""


class LedgerIntegrityError(FedroundError):
    """A ledger is missing, truncated, reordered or tampered with. Never treated as empty:
    spending against a ledger that cannot be trusted could exceed the budget."""


class BudgetExceeded(FedroundError):
    """A run would spend more than a tenant's or site's privacy budget."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One round's spend against one scope: ``steps`` Poisson-sampled Gaussian steps of
    noise multiplier σ at rate q. Client-level DP spends one step per round at the sampled
    share of the federation's sites (q = 1 under local DP, where the coordinator knows who
    took part); record-level DP (``mode: record``) spends a site's DP-SGD steps of the round
    at its batch sampling rate."""

    sequence: int
    scope: str  # "tenant" or "site:<name>"
    tenant: str
    federation: str
    run_id: str
    round: int
    mode: str  # central | local
    noise_multiplier: float
    sampling_rate: float
    clip_norm: float
    sites: tuple[str, ...]  # tenant entries: the sites the round charged
    recorded_at: str
    previous_sha256: str
    steps: int = 1

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.federation, self.run_id, self.round)

    @property
    def mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sampling_rate, self.steps)

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): the bytes stored and hashed. ``steps``
        is written only when it is not 1, so that entries written before it existed keep
        their bytes and digests."""
        record = asdict(self)
        record["sites"] = list(self.sites)
        if self.steps == 1:
            del record["steps"]
        return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LedgerEntry:
        try:
            record = json.loads(raw)
            record["sites"] = tuple(record.get("sites", ()))
            entry = cls(**record)
        except (ValueError, TypeError, AttributeError) as exc:
            raise LedgerIntegrityError(f"a ledger entry is not readable: {exc}") from None
        if entry.to_bytes() != raw:
            raise LedgerIntegrityError(
                f"ledger entry {entry.sequence} is not in its canonical form: it was edited"
            )
        return entry


@dataclass(frozen=True, slots=True)
class LedgerHead:
    """The newest entry of a ledger: its sequence number and the SHA-256 of its bytes."""

    sequence: int
    sha256: str

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LedgerHead:
        try:
            record = json.loads(raw)
            return cls(sequence=int(record["sequence"]), sha256=str(record["sha256"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise LedgerIntegrityError(f"the ledger head is not readable: {exc}") from None


def sha256_of(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()


def verify_chain(
    stored: Sequence[tuple[int, bytes]], head: LedgerHead | None, where: str
) -> list[LedgerEntry]:
    """The entries of a ledger, checked: ``stored`` is (sequence from the object's name,
    bytes) for every entry object; ``head`` the head object, ``None`` if there is none.

    An empty ledger without a head is a new one. Anything else must be a gapless chain
    0…head, each entry naming its predecessor's digest and the head naming the last's;
    otherwise :class:`LedgerIntegrityError` saying what is wrong ``where``.
    """
    if not stored:
        if head is not None:
            raise LedgerIntegrityError(
                f"{where}: the head names entry {head.sequence} but the ledger has no entries: "
                "it was deleted; restore it from a backup (a missing ledger is never read as "
                "an unspent budget)"
            )
        return []
    if head is None:
        raise LedgerIntegrityError(
            f"{where}: {len(stored)} entries but no head: the head was deleted or the ledger "
            "was copied in part; restore it from a backup"
        )
    entries: list[LedgerEntry] = []
    digests: list[str] = []
    previous = GENESIS
    ordered = sorted(stored)
    for expected, (sequence, raw) in enumerate(ordered):
        if sequence != expected:
            raise LedgerIntegrityError(
                f"{where}: entry {expected} is missing (next is {sequence}): entries were "
                "removed; restore the ledger from a backup"
            )
        entry = LedgerEntry.from_bytes(raw)
        if entry.sequence != sequence:
            raise LedgerIntegrityError(
                f"{where}: the object of entry {sequence} holds entry {entry.sequence}"
            )
        if entry.previous_sha256 != previous:
            raise LedgerIntegrityError(
                f"{where}: entry {sequence} does not follow entry {sequence - 1} (its "
                "predecessor's digest differs): an entry was edited or replaced"
            )
        previous = sha256_of(raw)
        digests.append(previous)
        entries.append(entry)
    last = ordered[-1][0]
    if head.sequence > last:
        raise LedgerIntegrityError(
            f"{where}: the head names entry {head.sequence} but the ledger ends at {last}: "
            "it was truncated; restore it from a backup"
        )
    # Entries past the head that chain correctly are appends whose head move was cut
    # short (the entry is written first): the next append moves the head.
    if head.sequence < 0 or head.sha256 != digests[head.sequence]:
        raise LedgerIntegrityError(
            f"{where}: entry {head.sequence} differs from the one the head recorded: it "
            "was edited or replaced"
        )
    duplicate = [k for k, n in Counter(e.key for e in entries).items() if n > 1]
    if duplicate:
        raise LedgerIntegrityError(f"{where}: rounds recorded twice: {duplicate[:3]}")
    return entries


def cross_check(tenant: Sequence[LedgerEntry], site: str, entries: Sequence[LedgerEntry]) -> None:
    """The tenant's ledger and ``site``'s agree: every tenant entry that charged the site
    has its entry in the site's ledger (sites are written first, the tenant entry last, so
    a missing site entry means a deleted or truncated site ledger)."""
    recorded = {e.key for e in entries}
    missing = [e.key for e in tenant if site in e.sites and e.key not in recorded]
    if missing:
        federation, run, round_ = missing[0]
        raise LedgerIntegrityError(
            f"the ledger of site {site} lacks {len(missing)} round(s) the tenant's ledger "
            f"charged it (first: {federation} run {run} round {round_}): the site's ledger "
            "was deleted or truncated; restore it from a backup"
        )


Mechanism = tuple[float, float, int]
"""(σ, q, steps): ``steps`` Poisson-subsampled Gaussian steps of noise multiplier σ at rate q."""


def spent_epsilon(
    mechanisms: Iterable[tuple[float, float] | Mechanism], delta: float, accountant: Accountant
) -> float:
    """ε of composing the Poisson-subsampled Gaussian steps of ``mechanisms`` ((σ, q) for
    one step, (σ, q, steps) for several) (0.0 for none), by ``accountant``; identical steps
    are self-composed (fast), and a history already accounted is not accounted again (the
    tenant's and its sites' ledgers usually hold the same steps)."""
    counts: Counter[tuple[float, float]] = Counter()
    for mechanism in mechanisms:
        steps = int(mechanism[2]) if len(mechanism) > 2 else 1
        counts[(float(mechanism[0]), float(mechanism[1]))] += steps
    if not counts:
        return 0.0
    return _composed_epsilon(tuple(sorted(counts.items())), float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _composed_epsilon(
    steps: tuple[tuple[tuple[float, float], int], ...], delta: float, accountant: Accountant
) -> float:
    import dp_accounting  # here, not at import: a run without DP never loads it

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count
        )
        for (sigma, q), count in steps
    ]
    event = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)
    ledger = _accountant(accountant).compose(event)
    with np.errstate(over="ignore", divide="ignore"):
        return float(ledger.get_epsilon(delta))


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """A scope's budget against what it has spent and what a run plans to spend."""

    scope: str
    budget_epsilon: float
    delta: float
    spent: float  # ε of the entries so far
    planned: float  # ε of the entries so far and the planned rounds together
    planned_rounds: int

    @property
    def fits(self) -> bool:
        return self.planned <= self.budget_epsilon

    def refusal(self) -> str:
        return (
            f"privacy budget of {self.scope} would be exceeded: budget ε={self.budget_epsilon:g} "
            f"at δ={self.delta:g}; spent so far ε={_fmt(self.spent)}; with this run's "
            f"{self.planned_rounds} planned round(s) ε={_fmt(self.planned)}. Lower "
            "rounds or selection.fraction, raise privacy.noise_multiplier, or raise the "
            "budget (privacy.budget.epsilon)"
        )


def check_budget(
    scope: str,
    entries: Sequence[LedgerEntry],
    planned: Sequence[tuple[float, float] | Mechanism],
    budget_epsilon: float,
    delta: float,
    accountant: Accountant,
) -> BudgetCheck:
    """:class:`BudgetCheck` of ``entries`` plus the ``planned`` rounds ((σ, q) or
    (σ, q, steps) each)."""
    spent = spent_epsilon((e.mechanism for e in entries), delta, accountant)
    total = spent_epsilon([*(e.mechanism for e in entries), *planned], delta, accountant)
    return BudgetCheck(scope, budget_epsilon, delta, spent, total, len(planned))


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4g}"


class BudgetReached(BudgetExceeded):
    """The next round of a running training would take a tenant or site past its budget:
    the run stops after the last round that fit, and registers that model."""
