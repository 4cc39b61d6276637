"""The privacy-budget ledgers in the object store: one per tenant and one per site.

``_tenants/<tenant>/privacy-ledger/tenant/`` and ``…/sites/<site>/`` hold one JSON object
per entry, ``<sequence>.json``, and a ``head.json`` (see :mod:`fedround.tasks.core.
privacy.ledger` for the chain and the accounting). No site credential reaches these keys
(they lie outside every federation's prefix). Appending is a conditional create of the
next sequence number, so concurrent runs of a tenant never overwrite each other; the head
moves after the entry by compare-and-swap.

What a round charges, under DP-FedAvg with the federation's N sites of which m are
sampled (q = m/N):

- ``central``: the tenant, and *every* site of the federation, one (σ, q) step: the
  accountant's amplification by subsampling assumes any site may have been in the round;
- ``local``: the tenant one (σ, 1) step, and each *selected* site one (σ, 1) step (the
  coordinator knows who took part, so there is no amplification; sites left out spend
  nothing);
- ``record``: each *selected* site the DP-SGD steps it took, ``local_epochs``·k at rate
  q = 1/k, k = ⌈n / batch_size⌉ batches of its n examples (n: the count its data contract
  reported, the same bound the round weighs it by); the tenant, per round, the most any
  selected site spent: the largest q and the most steps among them, which dominates each
  site's round (ε grows with q and with the steps), so the tenant's ledger bounds what any
  one example, at any site, has spent.

A round is recorded *before* its checkpoint commits (spend, then release): a crash in
between counts a round that was never released, at most once, since a resumed run records
the same (run, round) again as a no-op. Site entries are written before the tenant's, so
every tenant entry vouches for the site entries it names (:func:`~fedround.tasks.core.
privacy.ledger.cross_check`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from fedround.tasks.core import keys
from fedround.tasks.core.config import FederationConfig
from fedround.tasks.core.errors import ObjectNotFound, ObjectStoreError
from fedround.tasks.core.privacy.ledger import (
    GENESIS,
    BudgetCheck,
    BudgetExceeded,
    LedgerEntry,
    LedgerHead,
    LedgerIntegrityError,
    Mechanism,
    check_budget,
    cross_check,
    sha256_of,
    spent_epsilon,
    verify_chain,
)
from fedround.tasks.core.privacy.record import dp_steps
from fedround.tasks.object_store import ObjectStore

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^(\d{12})\.json$")


class PrivacyLedger:
    """The ledger of one tenant (``site=None``) or of one of its sites."""

    def __init__(self, store: ObjectStore, tenant: str, site: str | None = None) -> None:
        self.store = store
        self.tenant = tenant
        self.site = site
        self.scope = "tenant" if site is None else f"site:{site}"
        self.prefix = keys.privacy_ledger_prefix(tenant, site)
        self.head_key = keys.privacy_ledger_head_key(tenant, site)

    @property
    def label(self) -> str:
        return (
            f"tenant {self.tenant}"
            if self.site is None
            else f"site {self.site} of tenant {self.tenant}"
        )

    def _stored(self) -> list[tuple[int, bytes]]:
        found = []
        for key in self.store.list(self.prefix):
            match = _ENTRY.match(key[len(self.prefix) :])
            if match:
                found.append((int(match.group(1)), self.store.get(key)))
        return sorted(found)

    def _head(self) -> tuple[LedgerHead | None, bytes | None]:
        try:
            raw = self.store.get(self.head_key)
        except ObjectNotFound:
            return None, None
        return LedgerHead.from_bytes(raw), raw

    def read(self) -> list[LedgerEntry]:
        """Every entry, verified (:class:`LedgerIntegrityError` if it fails)."""
        head, _ = self._head()
        return verify_chain(self._stored(), head, f"privacy ledger of {self.label}")

    def append(
        self,
        config: FederationConfig,
        run_id: str,
        round_: int,
        sampling_rate: float,
        sites: tuple[str, ...] = (),
        attempts: int = 20,
        steps: int = 1,
    ) -> LedgerEntry | None:
        """Record ``round_`` of ``run_id``; ``None`` if it is recorded already."""
        privacy = config.privacy
        assert privacy.noise_multiplier is not None and privacy.clip_norm is not None
        for _ in range(attempts):
            head, _ = self._head()
            stored = self._stored()
            entries = verify_chain(stored, head, f"privacy ledger of {self.label}")
            if any(e.key == (config.federation, run_id, round_) for e in entries):
                return None
            previous = sha256_of(stored[-1][1]) if stored else GENESIS
            entry = LedgerEntry(
                sequence=len(entries),
                scope=self.scope,
                tenant=self.tenant,
                federation=config.federation,
                run_id=run_id,
                round=round_,
                mode=privacy.mode,
                noise_multiplier=float(privacy.noise_multiplier),
                sampling_rate=float(sampling_rate),
                clip_norm=float(privacy.clip_norm),
                sites=tuple(sorted(sites)),
                recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
                previous_sha256=previous,
                steps=int(steps),
            )
            raw = entry.to_bytes()
            if not self.store.create(
                keys.privacy_ledger_entry_key(self.tenant, self.site, entry.sequence), raw
            ):
                continue  # a concurrent run took this number: read again
            self._move_head(LedgerHead(entry.sequence, sha256_of(raw)), attempts)
            return entry
        raise LedgerIntegrityError(
            f"could not append to the privacy ledger of {self.label} after {attempts} attempts "
            "(too many concurrent writers?)"
        )

    def _move_head(self, new: LedgerHead, attempts: int) -> None:
        """Point the head at ``new`` unless it records a later entry already. The entry is
        written by now; a head left behind is moved by the next append."""
        data = new.to_bytes()
        try:
            for _ in range(attempts):
                head, raw = self._head()
                if raw is None:
                    if self.store.create(self.head_key, data):
                        return
                    continue
                if head is not None and head.sequence >= new.sequence:
                    return
                if self.store.replace(self.head_key, data, expected=raw):
                    return
        except ObjectStoreError as exc:
            log.warning("privacy ledger head of %s not moved (%s)", self.label, exc)


# --- what a federation config spends ------------------------------------------------------


def planned_sampling_rate(config: FederationConfig) -> float:
    """q of a round as planned: the sites :func:`~fedround.tasks.core.selection.select_sites`
    takes, ``max(min_sites, ⌈fraction·N⌉)``, over the N sites; 1 under local DP."""
    if config.privacy.mode == "local":
        return 1.0
    n = len(config.sites)
    wanted = max(config.selection.min_sites, math.ceil(config.selection.fraction * n - 1e-9))
    return min(1.0, wanted / n)


def round_sampling_rate(config: FederationConfig, selected: int) -> float:
    """q of a round that selected ``selected`` sites (1 under local DP)."""
    if config.privacy.mode == "local":
        return 1.0
    return min(1.0, selected / len(config.sites))


def record_mechanisms(
    config: FederationConfig, examples: Mapping[str, int], sites: Sequence[str]
) -> dict[str | None, Mechanism]:
    """``mode: record``: what one round spends at each of ``sites`` (its DP-SGD steps, from
    the examples its contract reported) and for the tenant (key ``None``: the largest q and
    the most steps among them)."""
    assert config.privacy.noise_multiplier is not None
    sigma = float(config.privacy.noise_multiplier)
    training = config.training
    spends: dict[str | None, Mechanism] = {}
    for site in sites:
        q, steps = dp_steps(examples.get(site, 1), training.batch_size, training.local_epochs)
        spends[site] = (sigma, q, steps)
    if spends:
        spends[None] = (
            sigma,
            max(m[1] for m in spends.values()),
            max(m[2] for m in spends.values()),
        )
    return spends


@dataclass(frozen=True)
class Ledgers:
    """A tenant's ledger and those of a federation's sites, read and verified together."""

    tenant: list[LedgerEntry]
    sites: dict[str, list[LedgerEntry]]


def read_ledgers(store: ObjectStore, tenant: str, sites: list[str]) -> Ledgers:
    """The tenant's ledger and each site's, verified and cross-checked."""
    tenant_entries = PrivacyLedger(store, tenant).read()
    site_entries: dict[str, list[LedgerEntry]] = {}
    for site in sites:
        site_entries[site] = PrivacyLedger(store, tenant, site).read()
        cross_check(tenant_entries, site, site_entries[site])
    return Ledgers(tenant_entries, site_entries)


def budget_checks(
    config: FederationConfig,
    ledgers: Ledgers,
    planned: Mapping[str | None, Sequence[tuple[float, float] | Mechanism]],
) -> list[BudgetCheck]:
    """The budget check of the tenant (key ``None``) and of each site in ``planned``."""
    privacy = config.privacy
    assert privacy.budget is not None
    checks = []
    for site, rounds in planned.items():
        entries = ledgers.tenant if site is None else ledgers.sites[site]
        scope = f"tenant {config.tenant}" if site is None else f"site {site}"
        checks.append(
            check_budget(
                scope,
                entries,
                rounds,
                privacy.budget.epsilon,
                privacy.budget_delta,
                privacy.accountant,
            )
        )
    return checks


def check_before_run(
    store: ObjectStore, config: FederationConfig, run_id: str, committed: list[int]
) -> list[BudgetCheck]:
    """Refuse a run that would overspend, before it starts.

    Reads and verifies the ledgers (a broken one raises :class:`LedgerIntegrityError`),
    checks that a resumed run's ``committed`` rounds are all recorded (else the ledger
    lost them), and with a budget raises :class:`BudgetExceeded` if the rounds not yet
    recorded, at the planned q, would take the tenant or any site past it.
    """
    privacy = config.privacy
    if not privacy.enabled:
        return []
    assert privacy.noise_multiplier is not None
    site_names = [s.name for s in config.sites]
    ledgers = read_ledgers(store, config.tenant, site_names)
    recorded = {e.round for e in ledgers.tenant if e.key[:2] == (config.federation, run_id)}
    lost = sorted(r for r in committed if r > 0 and r not in recorded)
    if lost:
        raise LedgerIntegrityError(
            f"run {run_id} committed round(s) {lost[:5]} but the privacy ledger of tenant "
            f"{config.tenant} has no entry for them: the ledger was truncated or replaced; "
            "restore it from a backup before resuming"
        )
    if privacy.budget is None or privacy.mode == "record":  # record: check_record_plan
        return []
    rest = [r for r in range(1, config.rounds + 1) if r not in recorded]
    step = (float(privacy.noise_multiplier), planned_sampling_rate(config))
    planned: dict[str | None, list[tuple[float, float]]] = {None: [step] * len(rest)}
    for site in site_names:  # local DP: a site is planned in every round (at most)
        done = {e.round for e in ledgers.sites[site] if e.key[:2] == (config.federation, run_id)}
        planned[site] = [step] * sum(1 for r in range(1, config.rounds + 1) if r not in done)
    checks = budget_checks(config, ledgers, planned)
    for check in checks:
        if not check.fits:
            raise BudgetExceeded(check.refusal())
    return checks


def check_record_plan(
    store: ObjectStore, config: FederationConfig, run_id: str, examples: Mapping[str, int]
) -> list[BudgetCheck]:
    """``mode: record``, once the contracts have counted each site's examples and before
    any site trains: raise :class:`BudgetExceeded` if the rounds not yet recorded would
    take the tenant or a site past the budget, each site planned in every round."""
    privacy = config.privacy
    if privacy.mode != "record" or privacy.budget is None:
        return []
    sites = sorted(examples)
    ledgers = read_ledgers(store, config.tenant, sites)
    spends = record_mechanisms(config, examples, sites)

    def rest(entries: list[LedgerEntry]) -> int:
        done = {e.round for e in entries if e.key[:2] == (config.federation, run_id)}
        return sum(1 for r in range(1, config.rounds + 1) if r not in done)

    planned: dict[str | None, list[Mechanism]] = {None: [spends[None]] * rest(ledgers.tenant)}
    for site in sites:
        planned[site] = [spends[site]] * rest(ledgers.sites[site])
    checks = budget_checks(config, ledgers, planned)
    for check in checks:
        if not check.fits:
            raise BudgetExceeded(check.refusal())
    return checks


def charged_sites(config: FederationConfig, selected: list[str]) -> list[str]:
    """The sites a round's spend is charged to: under local and record-level DP the
    selected ones only (the others sent nothing); under central DP every site of the
    federation (the sampling is what amplifies privacy, so each site is charged the
    subsampled step)."""
    if config.privacy.mode in ("local", "record"):
        return selected
    return [s.name for s in config.sites]


def round_spends(
    config: FederationConfig,
    selected: list[str],
    examples: Mapping[str, int] | None = None,
) -> dict[str | None, Mechanism]:
    """What a round that selected ``selected`` charges the tenant (key ``None``) and each
    site it charges; ``examples``: each site's contract count (``mode: record``)."""
    privacy = config.privacy
    assert privacy.noise_multiplier is not None
    if privacy.mode == "record":
        return record_mechanisms(config, examples or {}, selected)
    step = (float(privacy.noise_multiplier), round_sampling_rate(config, len(selected)), 1)
    return {None: step, **{site: step for site in charged_sites(config, selected)}}


def round_fits(
    store: ObjectStore,
    config: FederationConfig,
    run_id: str,
    round_: int,
    selected: list[str],
    examples: Mapping[str, int] | None = None,
) -> BudgetCheck | None:
    """``None`` if ``round_``, having selected ``selected``, keeps the tenant and every site
    it charges within the budget (or there is no budget); else the first check it fails."""
    privacy = config.privacy
    if not privacy.enabled or privacy.budget is None or not selected:
        return None
    spends = round_spends(config, selected, examples)
    ledgers = read_ledgers(store, config.tenant, [s for s in spends if s is not None])
    key = (config.federation, run_id, round_)
    scopes: list[tuple[str | None, list[LedgerEntry]]] = [
        (None, ledgers.tenant),
        *ledgers.sites.items(),
    ]
    planned = {
        site: ([] if any(e.key == key for e in entries) else [spends[site]])
        for site, entries in scopes
    }
    for check in budget_checks(config, ledgers, planned):
        if not check.fits:
            return check
    return None


def record_round(
    store: ObjectStore,
    config: FederationConfig,
    run_id: str,
    round_: int,
    selected: list[str],
    examples: Mapping[str, int] | None = None,
) -> float:
    """Record ``round_`` in the ledgers of the sites it charges, then the tenant's; returns
    the ε the run has spent so far (its own rounds, at ``privacy.delta``)."""
    if not selected:
        return run_epsilon(store, config, run_id)
    spends = round_spends(config, selected, examples)
    charged = sorted(site for site in spends if site is not None)
    for site in charged:
        _, q, steps = spends[site]
        PrivacyLedger(store, config.tenant, site).append(config, run_id, round_, q, steps=steps)
    _, q, steps = spends[None]
    PrivacyLedger(store, config.tenant).append(
        config, run_id, round_, q, tuple(charged), steps=steps
    )
    return run_epsilon(store, config, run_id)


def run_epsilon(store: ObjectStore, config: FederationConfig, run_id: str) -> float:
    """ε the run's recorded rounds spend at ``privacy.delta``, by the configured accountant."""
    mine = [
        e.mechanism
        for e in PrivacyLedger(store, config.tenant).read()
        if e.key[:2] == (config.federation, run_id)
    ]
    return spent_epsilon(mine, config.privacy.delta, config.privacy.accountant)


def privacy_tags(store: ObjectStore, config: FederationConfig, run_id: str) -> dict[str, str]:
    """What the run spent, as ``fedround.privacy.*`` tags for its MLflow run and model
    version (empty when privacy is off): ε at δ, σ, C, accountant, rounds, q, mode, and
    the tenant ledger's head (where an auditor finds the entries)."""
    privacy = config.privacy
    if not privacy.enabled:
        return {}
    tenant_entries = PrivacyLedger(store, config.tenant).read()
    mine = [e for e in tenant_entries if e.key[:2] == (config.federation, run_id)]
    rates = sorted({e.sampling_rate for e in mine})
    epsilon = spent_epsilon((e.mechanism for e in mine), privacy.delta, privacy.accountant)
    tags = {
        "epsilon": "inf" if math.isinf(epsilon) else f"{epsilon:.6g}",
        "delta": f"{privacy.delta:g}",
        "noise_multiplier": f"{privacy.noise_multiplier:g}",
        "clip_norm": f"{privacy.clip_norm:g}",
        "accountant": privacy.accountant,
        "mode": privacy.mode,
        "rounds": str(len(mine)),
        "sampling_rate": ",".join(f"{q:.6g}" for q in rates),
        "steps_per_round": ",".join(str(n) for n in sorted({e.steps for e in mine})),
        "ledger": f"{keys.privacy_ledger_prefix(config.tenant)} entries "
        f"{mine[0].sequence}-{mine[-1].sequence}"
        if mine
        else "no entries",
    }
    if privacy.adaptive_clipping is not None:
        a = privacy.adaptive_clipping
        tags["clip_norm"] = (
            f"adaptive from {privacy.clip_norm:g} (quantile {a.target_quantile:g}, "
            f"rate {a.learning_rate:g})"
        )
    if privacy.budget is not None:
        total = spent_epsilon(
            (e.mechanism for e in tenant_entries), privacy.budget_delta, privacy.accountant
        )
        tags["tenant_epsilon_spent"] = f"{total:.6g} of {privacy.budget.epsilon:g}"
        tags["budget_delta"] = f"{privacy.budget_delta:g}"
    return {f"fedround.privacy.{k}": v for k, v in tags.items()}


__all__ = [
    "BudgetExceeded",
    "LedgerIntegrityError",
    "PrivacyLedger",
    "budget_checks",
    "check_before_run",
    "check_record_plan",
    "planned_sampling_rate",
    "privacy_tags",
    "read_ledgers",
    "record_round",
    "round_fits",
    "round_sampling_rate",
    "round_spends",
    "run_epsilon",
]
