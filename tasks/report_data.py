"""The facts behind ``fedround report``: one training run, or all runs of a tenant.

Gathered from where each fact lives, into typed models that :mod:`fedround.tasks.report_html`
renders (no HTML here):

- MLflow: the coordinator's run of the training run (found by its tag ``fedround.run_id``;
  site and user-code runs carry that tag too, but not ``fedround.config_sha256``), its
  params (config, strategy), tags (lineage), metric histories (global ``<metric>`` and
  per-site ``site.<site>.<name>`` per round) and artifacts (``lineage/rounds.json``,
  ``lineage/contracts.json``, ``cost/cost.json``); the registry (versions tagged with the
  run id, their aliases);
- the object store: the federation's audit log (promotions, rollbacks);
- ``<state>/runs/<run-id>/result.json`` only to find a run MLflow does not list by tag.

Reading works against the embedded sqlite store and a remote tracking server alike
(``MLFLOW_TRACKING_URI``): everything goes through ``MlflowClient``. The first half of the
module is pure (raw records → models); the second half reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field

from fedround.tasks.core.errors import FedroundError
from fedround.tasks.core.round_table import site_rows

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from fedround.tasks.runtime import CoordinatorSettings

log = logging.getLogger(__name__)

TAG = "fedround."
# What a site's cell in the participation grid can say, in the legend's order.
STATUSES = (
    "trained",
    "rejected",
    "failed",
    "late",
    "left out",
    "excluded",
    "not selected",
    "no record",
)
# Round figures of the coordinator that are not an evaluation of the model.
OPERATIONAL_METRICS = frozenset(
    {
        "sites_selected",
        "sites_accepted",
        "examples",
        "bytes_up",
        "bytes_up_dense",
        "bytes_down",
        "round_seconds",
        "slowest_site_train_seconds",
        "train_seconds_total",
        "orchestration_overhead_seconds",
        "dispatch_latency_max_seconds",
        "label_skew_max_tv_distance",
        "federated_examples",
        "federated_sites",
    }
)
# Per-site figures that are bookkeeping (time, traffic, counts), not a model metric.
SITE_FIGURES = frozenset(
    {
        "seconds",
        "bytes_up",
        "bytes_down",
        "bytes_up_dense",
        "num_examples",
        "dispatch_latency_seconds",
        "train_seconds",
        "strikes",
        "label_chi2",
        "label_tv_distance",
        "eval_examples",
    }
)
MAX_KNOWN = 20
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TENANT = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_LATE = re.compile(r"^(?P<site>.+) \(round (?P<round>\d+)\)$")

Series = list[tuple[int, float]]


class ReportError(FedroundError):
    """A report cannot be made: the run or tenant is unknown, or MLflow cannot be read."""


class UnknownRun(ReportError):
    """No training run has this id; the message lists the known ones."""


class UnknownTenant(ReportError):
    """No training run belongs to this tenant; the message lists the known tenants."""


# --- the models -------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class SiteRound(_Frozen):
    """One site in one round: what happened to it (``status``, one of :data:`STATUSES`),
    why (``reason``, written by the site or about it: untrusted text), and its figures."""

    site: str
    round: int
    status: str
    reason: str = ""
    examples: int = 0
    seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)


class SiteTotals(_Frozen):
    """A site's time and traffic over the whole run."""

    site: str
    rounds_trained: int = 0
    examples: int = 0
    seconds_total: float = 0.0
    seconds_median: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0


class ContractResult(_Frozen):
    """A site's data-contract result at the start of the run."""

    site: str
    success: bool
    summary: str = ""
    suite: str | None = None
    rows: int | None = None
    rules: int | None = None


class VersionInfo(_Frozen):
    """A registered model version the run produced, and the aliases it holds now."""

    name: str
    version: str
    aliases: list[str] = Field(default_factory=list)
    status: str | None = None
    semver: str | None = None
    registered_at: datetime | None = None


class AuditRow(_Frozen):
    """One audit-log entry of the run's model; ``this_run``: it concerns a version of this run."""

    sequence: int
    at: datetime
    actor: str
    action: str
    model: str
    version: str | None = None
    previous_production: str | None = None
    reason: str = ""
    this_run: bool = False


class CostLine(_Frozen):
    owner: str
    compute_seconds: float = 0.0
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    rounds: int = 0


class CostSummary(_Frozen):
    """``cost/cost.json``: compute seconds and bytes per site, the tenant's total."""

    tenant: str
    sites: list[CostLine]
    total: CostLine
    coordinator_seconds: float = 0.0
    note: str = ""


class RunReport(_Frozen):
    """Everything ``fedround report <run-id>`` shows."""

    run_id: str
    federation: str
    tenant: str
    status: str
    mlflow_run_id: str
    experiment: str
    tracking: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    config: dict[str, str] = Field(default_factory=dict)  # revision, sha256, git, DVC ...
    mode: str = "sync"
    rounds_planned: int | None = None
    lead_metric: str = "accuracy"
    strategy: dict[str, str] = Field(default_factory=dict)
    privacy: dict[str, str] = Field(default_factory=dict)  # empty: not configured
    final_metrics: dict[str, float] = Field(default_factory=dict)
    global_metrics: dict[str, Series] = Field(default_factory=dict)
    site_metrics: dict[str, dict[str, Series]] = Field(default_factory=dict)  # name → site → …
    sites: list[str] = Field(default_factory=list)
    rounds: list[int] = Field(default_factory=list)
    participation: list[SiteRound] = Field(default_factory=list)
    round_detail: bool = True  # False: rebuilt from metrics (no lineage/rounds.json)
    site_totals: list[SiteTotals] = Field(default_factory=list)
    contracts: list[ContractResult] | None = None
    versions: list[VersionInfo] = Field(default_factory=list)
    audit: list[AuditRow] = Field(default_factory=list)
    cost: CostSummary | None = None
    notes: list[str] = Field(default_factory=list)
    generated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class TenantRun(_Frozen):
    """One row of a tenant's dashboard."""

    run_id: str
    federation: str
    mlflow_run_id: str
    status: str
    started_at: datetime | None = None
    rounds_completed: int = 0
    rounds_planned: int | None = None
    metric: str = "accuracy"
    final_value: float | None = None
    sites_trained: int = 0
    sites_listed: int = 0
    versions: list[VersionInfo] = Field(default_factory=list)


class TenantReport(_Frozen):
    """Everything ``fedround report --tenant`` shows: the tenant's runs, newest first."""

    tenant: str
    tracking: str
    runs: list[TenantRun]
    generated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


# --- pure: raw records → models -----------------------------------------------------------


def _number(value: Any, default: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _count(value: Any) -> int:
    return max(0, int(_number(value)))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _reasons(value: Any) -> dict[str, str]:
    return {str(k): _text(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def _finite_metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float)}


def at_step(series: Series, step: int) -> float | None:
    """The last value logged at ``step`` (a resumed round logs its figures again)."""
    found = None
    for s, value in series:
        if s == step:
            found = value
    return found


def split_late(which: str, found_in: int) -> tuple[str, int]:
    """``"site-b (round 2)"`` → ``("site-b", 2)``: a late update belongs to the round it
    was sent for; anything else stays in the round it was found in."""
    match = _LATE.match(which)
    return (match["site"], int(match["round"])) if match else (which, found_in)


def _figures(
    site: str, round_: int, site_series: Mapping[str, Mapping[str, Series]]
) -> dict[str, Any]:
    series = site_series.get(site, {})
    value = {
        name: at_step(series.get(name, []), round_)
        for name in ("seconds", "bytes_up", "bytes_down", "num_examples")
    }
    metrics = {
        name: v
        for name, points in series.items()
        if name not in SITE_FIGURES and not name.startswith("eval_")
        for v in [at_step(points, round_)]
        if v is not None
    }
    return {
        "seconds": _number(value["seconds"]),
        "bytes_up": _count(value["bytes_up"]),
        "bytes_down": _count(value["bytes_down"]),
        "examples": _count(value["num_examples"]),
        "metrics": metrics,
    }


def _rows_of_round(
    round_: int,
    record: Mapping[str, Any],
    excluded: Mapping[str, str],
    site_series: Mapping[str, Mapping[str, Series]],
) -> list[SiteRound]:
    """A round's sites from a RoundSummary: its ``sites`` rows when it has them, else
    rebuilt from ``accepted``/``rejected``/``failed``/``late``/``left_out``."""
    rows: list[SiteRound] = []
    if isinstance(record.get("sites"), list):
        for raw in record["sites"]:
            if not isinstance(raw, Mapping) or not raw.get("site"):
                continue
            site, where = _text(raw["site"]), round_
            status = _text(raw.get("status")) or "no record"
            if status == "late":
                site, where = split_late(site, round_)
            rows.append(
                SiteRound(
                    site=site,
                    round=where,
                    status=status,
                    reason=_text(raw.get("reason")),
                    examples=_count(raw.get("examples")),
                    seconds=_number(raw.get("seconds")),
                    bytes_up=_count(raw.get("bytes_up")),
                    bytes_down=_count(raw.get("bytes_down")),
                    metrics=_finite_metrics(raw.get("metrics")),
                )
            )
        return rows
    accepted = {str(s): _count(n) for s, n in _mapping(record.get("accepted")).items()}
    reasons = {
        name: _reasons(record.get(name)) for name in ("rejected", "failed", "late", "left_out")
    }
    selected = [_text(s) for s in record.get("selected") or [] if _text(s)]
    touched = {*selected, *accepted, *reasons["rejected"], *reasons["failed"]}
    touched |= {*reasons["left_out"], *excluded}
    figures = {site: _figures(site, round_, site_series) for site in touched}
    for built in site_rows(
        selected=selected,
        accepted=accepted,
        rejected=reasons["rejected"],
        failed=reasons["failed"],
        late=reasons["late"],
        left_out=reasons["left_out"],
        excluded=excluded,
        figures={},  # the figures below are the site's metric histories, unbounded
    ):
        if built.status == "late":
            site, where = split_late(built.site, round_)
            rows.append(SiteRound(site=site, round=where, status="late", reason=built.reason))
            continue
        found = dict(figures[built.site])
        if built.status == "trained":
            found["examples"] = built.examples
        rows.append(
            SiteRound(
                site=built.site, round=round_, status=built.status, reason=built.reason, **found
            )
        )
    return rows


def participation_from_rounds(
    rounds: Mapping[str, Any],
    sites: Sequence[str],
    excluded: Mapping[str, str],
    site_series: Mapping[str, Mapping[str, Series]],
) -> tuple[list[SiteRound], list[int], list[str]]:
    """Every site × round of ``lineage/rounds.json`` (``{"<round>": RoundSummary}``):
    the rows, the rounds, and notes on records that could not be read. A site a round did
    not touch is ``not selected``; a late update marks the round it was sent for."""
    notes: list[str] = []
    by_cell: dict[tuple[str, int], SiteRound] = {}
    late: list[SiteRound] = []
    numbers: set[int] = set()
    for key, record in rounds.items():
        try:
            round_ = int(key)
        except ValueError:
            notes.append(f"lineage/rounds.json: entry {key[:40]!r} is not a round number, skipped")
            continue
        if not isinstance(record, Mapping):
            notes.append(f"lineage/rounds.json: round {round_} is not a record, skipped")
            continue
        numbers.add(round_)
        for row in _rows_of_round(round_, record, excluded, site_series):
            if row.status == "late":
                late.append(row)
            else:
                by_cell[(row.site, row.round)] = row
    for row in late:  # a late update: it did train, after the round it was sent for closed
        earlier = by_cell.get((row.site, row.round))
        reason = (
            row.reason
            if earlier is None or not earlier.reason
            else f"{earlier.reason}; then {row.reason}"
        )
        base = earlier or row
        by_cell[(row.site, row.round)] = base.model_copy(
            update={"status": "late", "reason": reason}
        )
        numbers.add(row.round)
    ordered = sorted(numbers)
    everyone = list(dict.fromkeys([*sites, *sorted({site for site, _ in by_cell})]))
    rows = [
        by_cell.get((site, round_)) or SiteRound(site=site, round=round_, status="not selected")
        for site in everyone
        for round_ in ordered
    ]
    return rows, ordered, notes


def participation_from_metrics(
    site_series: Mapping[str, Mapping[str, Series]],
    sites: Sequence[str],
    excluded: Mapping[str, str],
    rounds: Iterable[int],
) -> list[SiteRound]:
    """Without ``lineage/rounds.json`` (a crashed run): a site trained in a round if it
    logged figures at that step; excluded sites are excluded; anything else is unknown."""
    everyone = list(dict.fromkeys([*sites, *sorted(site_series), *sorted(excluded)]))
    rows = []
    for round_ in sorted(set(rounds)):
        for site in everyone:
            figures = _figures(site, round_, site_series)
            series = site_series.get(site, {})
            trained = any(
                at_step(series.get(name, []), round_) is not None
                for name in ("seconds", "num_examples")
            )
            if trained:
                rows.append(SiteRound(site=site, round=round_, status="trained", **figures))
            elif site in excluded:
                rows.append(
                    SiteRound(site=site, round=round_, status="excluded", reason=excluded[site])
                )
            else:
                rows.append(SiteRound(site=site, round=round_, status="no record"))
    rows.sort(key=lambda r: (everyone.index(r.site), r.round))
    return rows


def site_totals(rows: Sequence[SiteRound], sites: Sequence[str]) -> list[SiteTotals]:
    """Time and traffic per site over the run's rows (every site, in ``sites`` order first)."""
    everyone = list(dict.fromkeys([*sites, *(r.site for r in rows)]))
    totals = []
    for site in everyone:
        mine = [r for r in rows if r.site == site]
        seconds = [r.seconds for r in mine if r.seconds > 0]
        totals.append(
            SiteTotals(
                site=site,
                rounds_trained=sum(r.status == "trained" for r in mine),
                examples=sum(r.examples for r in mine if r.status == "trained"),
                seconds_total=sum(seconds),
                seconds_median=statistics.median(seconds) if seconds else 0.0,
                bytes_up=sum(r.bytes_up for r in mine),
                bytes_down=sum(r.bytes_down for r in mine),
            )
        )
    return totals


def contract_results(raw: Any) -> list[ContractResult] | None:
    """``lineage/contracts.json`` (``{site: {success, summary, suite, rows, rules}}``)."""
    if not isinstance(raw, Mapping):
        return None
    results = []
    for site, record in sorted(raw.items()):
        if not isinstance(record, Mapping):
            continue
        rows, rules = record.get("rows"), record.get("rules")
        results.append(
            ContractResult(
                site=str(site),
                success=record.get("success") is True,
                summary=_text(record.get("summary")),
                suite=_text(record["suite"]) if record.get("suite") is not None else None,
                rows=_count(rows) if rows is not None else None,
                rules=_count(rules) if rules is not None else None,
            )
        )
    return results


def _cost_line(owner: str, raw: Any) -> CostLine:
    raw = raw if isinstance(raw, Mapping) else {}
    return CostLine(
        owner=owner,
        compute_seconds=_number(raw.get("compute_seconds")),
        bytes_up=_number(raw.get("bytes_up")),
        bytes_down=_number(raw.get("bytes_down")),
        rounds=_count(raw.get("rounds")),
    )


def cost_summary(raw: Any) -> CostSummary | None:
    """``cost/cost.json`` as written by :meth:`fedround.tasks.core.costs.CostReport.to_dict`."""
    if not isinstance(raw, Mapping):
        return None
    sites = _mapping(raw.get("sites"))
    return CostSummary(
        tenant=_text(raw.get("tenant")),
        sites=[_cost_line(str(site), line) for site, line in sites.items()],
        total=_cost_line("tenant total", raw.get("tenant_total")),
        coordinator_seconds=_number(raw.get("coordinator_seconds")),
        note=_text(raw.get("note")),
    )


def evaluation_metric_names(keys: Iterable[str]) -> list[str]:
    """The run-level metrics that evaluate the model per round (central ``accuracy``,
    ``loss``, ..., and ``federated_<metric>``), not counts, timings, cost or final values."""
    return sorted(
        key
        for key in keys
        if "." not in key
        and key not in OPERATIONAL_METRICS
        and not key.startswith(("final_", "label_skew", "privacy", "dp_"))
    )


def site_metric_key(key: str) -> tuple[str, str] | None:
    """``site.<site>.<name>`` → ``(site, name)`` (site names hold no dots)."""
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "site" and parts[1] and parts[2]:
        return parts[1], parts[2]
    return None


def strategy_settings(params: Mapping[str, str]) -> dict[str, str]:
    """The run's strategy and the settings it was given (``strategy.*`` params, unset left out)."""
    found = {
        key.removeprefix("strategy."): value
        for key, value in params.items()
        if key.startswith("strategy.") and value not in ("None", "")
    }
    if params.get("mode"):
        found["mode"] = params["mode"]
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != "name", kv[0])))


def privacy_settings(
    params: Mapping[str, str], tags: Mapping[str, str], metrics: Mapping[str, float]
) -> dict[str, str]:
    """Differential-privacy settings and spend, if the run has any (none: an empty dict).
    A run with ``privacy.mode: off`` logs the section's defaults: those are no settings."""
    off = params.get("privacy.mode") in ("off", "False")
    found = {
        key: value
        for key, value in params.items()
        if key.startswith(("privacy.", "dp.")) and value not in ("None", "") and not off
    }
    found.update({k.removeprefix(TAG): v for k, v in tags.items() if k.startswith(f"{TAG}privacy")})
    found.update(
        {k: f"{v:g}" for k, v in metrics.items() if k.startswith(("privacy", "dp_", "dp."))}
    )
    return dict(sorted(found.items()))


def config_facts(tags: Mapping[str, str]) -> dict[str, str]:
    """The config's revision and digests from the run's tags (``fedround.config_*``, ...)."""
    wanted = ("config_", "contract_", "allow_dirty", "prefect_flow_run_id", "parent_")
    return {
        key.removeprefix(TAG): value
        for key, value in sorted(tags.items())
        if key.startswith(tuple(TAG + w for w in wanted)) and key != f"{TAG}config_path"
    }


def excluded_sites(
    tags: Mapping[str, str], contracts: Sequence[ContractResult] | None
) -> dict[str, str]:
    """Sites whose data contract failed: the run's tag, or failed contract results."""
    try:
        found = json.loads(tags.get(f"{TAG}excluded_sites", "{}"))
    except ValueError:
        found = {}
    excluded = _reasons(found)
    for result in contracts or []:
        if not result.success:
            excluded.setdefault(result.site, result.summary or "failed its data contract")
    return excluded


def redacted(uri: str) -> str:
    """A tracking URI without the password it may carry."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _when(millis: int | None) -> datetime | None:
    return datetime.fromtimestamp(millis / 1000, UTC) if millis else None


# --- reading: MLflow, the registry, the audit log -----------------------------------------


def _mlflow_errors() -> tuple[type[Exception], ...]:
    from mlflow.exceptions import MlflowException

    try:
        from requests.exceptions import RequestException
    except ImportError:  # pragma: no cover - mlflow depends on requests
        return (MlflowException,)
    return (MlflowException, RequestException)


def _is_coordinator_run(run: Run) -> bool:
    """The training run's own MLflow run: site and user-code runs inside the federation are
    tagged with the run id too, but only the coordinator's records the config digest."""
    tags = run.data.tags
    return f"{TAG}config_sha256" in tags and f"{TAG}site" not in tags


class ReportSource:
    """MLflow (and the object store) as the coordinator sees them."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.tracking_uri = settings.tracking_uri
        self._client: MlflowClient | None = None

    @property
    def where(self) -> str:
        """How messages name the store: the state dir in the embedded default."""
        if self.tracking_uri == self._default_uri:
            return str(self.settings.state_dir)
        return redacted(self.tracking_uri)

    @property
    def _default_uri(self) -> str:
        return f"sqlite:///{self.settings.state_dir / 'mlflow.db'}"

    def _store_exists(self) -> bool:
        """False for a sqlite file that is not there (reading must not create it)."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return True
        return Path(self.tracking_uri.removeprefix("sqlite:///")).exists()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
        return self._client

    def _experiment_ids(self) -> list[str]:
        ids: list[str] = []
        token = None
        while True:
            page = self.client.search_experiments(max_results=1000, page_token=token)
            ids += [e.experiment_id for e in page]
            token = page.token
            if not token:
                return ids

    def runs(self, filter_string: str = "", limit: int = 5000) -> list[Run]:
        """Coordinator runs matching ``filter_string``, newest first."""
        if not self._store_exists():
            return []
        experiments = self._experiment_ids()
        found: list[Run] = []
        token = None
        while experiments and len(found) < limit:
            page = self.client.search_runs(
                experiments,
                filter_string=filter_string,
                max_results=1000,
                order_by=["attributes.start_time DESC"],
                page_token=token,
            )
            found += [run for run in page if _is_coordinator_run(run)]
            token = page.token
            if not token:
                break
        return found

    def known_run_ids(self) -> list[str]:
        """Training run ids, newest first: MLflow's, then run folders MLflow does not list."""
        ids = [run.data.tags[f"{TAG}run_id"] for run in self.runs(f"tags.`{TAG}run_id` != ''")]
        runs_dir = self.settings.runs_dir
        if runs_dir.is_dir():
            folders = sorted(
                (p for p in runs_dir.iterdir() if (p / "result.json").is_file()),
                key=lambda p: p.stat().st_mtime,
                reverse=True,
            )
            ids += [p.name for p in folders]
        return list(dict.fromkeys(ids))

    def known_tenants(self) -> list[str]:
        tenants = (run.data.tags.get(f"{TAG}tenant", "") for run in self.runs())
        return sorted({t for t in tenants if t})

    def find_run(self, run_id: str) -> Run:
        """The coordinator's MLflow run of training run ``run_id``, or :class:`UnknownRun`."""
        if _RUN_ID.match(run_id) and ".." not in run_id:
            found = self.runs(f"tags.`{TAG}run_id` = '{run_id}'", limit=1)
            if found:
                return found[0]
            by_result = self._run_from_result(run_id)
            if by_result is not None:
                return by_result
        known = self.known_run_ids()
        listed = ", ".join(known[:MAX_KNOWN]) + (", …" if len(known) > MAX_KNOWN else "")
        raise UnknownRun(
            f"no run {run_id[:100]}; runs under {self.where}: {listed or 'none'}"
            + ("" if known else " (check --state-dir or MLFLOW_TRACKING_URI)")
        )

    def _run_from_result(self, run_id: str) -> Run | None:
        """A run MLflow does not list by tag, named in ``<state>/runs/<id>/result.json``."""
        result = self.settings.runs_dir / run_id / "result.json"
        try:
            mlflow_run_id = json.loads(result.read_text())["mlflow"]["run_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not self._store_exists():
            return None
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(str(mlflow_run_id))
        except MlflowException:
            return None

    def histories(self, run: Run, keys: Iterable[str]) -> dict[str, Series]:
        return {
            key: [(m.step, m.value) for m in self.client.get_metric_history(run.info.run_id, key)]
            for key in keys
        }

    def artifact(self, run: Run, path: str) -> Any:
        from fedround.tasks.run_lineage import load_run_json

        return load_run_json(run.info.run_id, path, self.tracking_uri)

    def versions_of(self, run_id: str, run: Run) -> list[VersionInfo]:
        """Registered versions tagged with ``run_id`` (of this run's federation), with the
        aliases each holds now; the run's own ``fedround.model_*`` tags as a fallback."""
        from mlflow.exceptions import MlflowException

        federation = run.data.tags.get(f"{TAG}federation")
        try:
            found = list(self.client.search_model_versions(f"tags.`{TAG}run_id` = '{run_id}'"))
        except MlflowException:
            found = []
        found = [v for v in found if v.tags.get(f"{TAG}federation", federation) == federation]
        name, number = (
            run.data.tags.get(f"{TAG}model_name"),
            run.data.tags.get(f"{TAG}model_version"),
        )
        if name and number and not any(v.name == name and str(v.version) == number for v in found):
            with contextlib.suppress(MlflowException):  # deleted since
                found.append(self.client.get_model_version(name, number))
        aliases: dict[str, dict[str, list[str]]] = {}
        versions = []
        for v in sorted(found, key=lambda v: (v.name, int(v.version))):
            if v.name not in aliases:
                held: dict[str, list[str]] = {}
                try:
                    for alias, at in self.client.get_registered_model(v.name).aliases.items():
                        held.setdefault(str(at), []).append(alias)
                except MlflowException:
                    pass
                aliases[v.name] = held
            versions.append(
                VersionInfo(
                    name=v.name,
                    version=str(v.version),
                    aliases=sorted(aliases[v.name].get(str(v.version), [])),
                    status=v.tags.get(f"{TAG}status"),
                    semver=v.tags.get(f"{TAG}semver"),
                    registered_at=_when(v.creation_timestamp),
                )
            )
        return versions

    def audit_of(
        self, federation: str, models: Iterable[str], ours: set[tuple[str, str]]
    ) -> tuple[list[AuditRow], list[str]]:
        """The audit-log entries of ``models`` and notes on what could not be read."""
        from fedround.tasks.audit import AuditLog
        from fedround.tasks.object_store import open_store

        rows: list[AuditRow] = []
        notes: list[str] = []
        try:
            log_ = AuditLog(open_store(self.settings.object_store), federation)
            for model in sorted(set(models)):
                entries, unreadable = log_.read(model)
                notes += [f"audit log: malformed entry left out: {u}" for u in unreadable]
                rows += [
                    AuditRow(
                        sequence=e.sequence,
                        at=e.at,
                        actor=e.actor,
                        action=e.action,
                        model=e.model,
                        version=e.version,
                        previous_production=e.previous_production,
                        reason=e.reason,
                        this_run=(e.model, e.version or "") in ours
                        or (e.model, e.previous_production or "") in ours,
                    )
                    for e in entries
                ]
        except FedroundError as exc:
            notes.append(f"audit log of {federation} could not be read: {exc}")
        return sorted(rows, key=lambda r: r.sequence), notes


def _site_series(source: ReportSource, run: Run) -> dict[str, dict[str, Series]]:
    """``{site: {name: [(round, value), ...]}}`` of every ``site.<site>.<name>`` metric."""
    keys = {key: parsed for key in run.data.metrics if (parsed := site_metric_key(key))}
    series: dict[str, dict[str, Series]] = {}
    for key, points in source.histories(run, keys).items():
        site, name = keys[key]
        series.setdefault(site, {})[name] = sorted(points)
    return series


def gather_run(settings: CoordinatorSettings, run_id: str) -> RunReport:
    """Everything recorded about training run ``run_id`` (:class:`UnknownRun` if none)."""
    source = ReportSource(settings)
    try:
        return _gather_run(source, run_id)
    except _mlflow_errors() as exc:
        raise ReportError(
            f"cannot read MLflow at {source.where}: {str(exc)[:300]}; check that the tracking "
            "server is up and MLFLOW_TRACKING_URI (or --state-dir) points at it"
        ) from exc


def _gather_run(source: ReportSource, run_id: str) -> RunReport:
    from fedround.tasks.run_lineage import (
        CONTRACTS_ARTIFACT,
        COST_ARTIFACT,
        ROUNDS_ARTIFACT,
    )

    run = source.find_run(run_id)
    tags, params, metrics = dict(run.data.tags), dict(run.data.params), dict(run.data.metrics)
    federation = tags.get(f"{TAG}federation") or params.get("federation", "?")
    experiment = source.client.get_experiment(run.info.experiment_id)
    notes: list[str] = []
    site_series = _site_series(source, run)
    names = evaluation_metric_names(metrics)
    global_series = {k: sorted(v) for k, v in source.histories(run, names).items()}
    counts = source.histories(run, ["sites_selected"] if "sites_selected" in metrics else [])
    by_name: dict[str, dict[str, Series]] = {}
    for site, named in site_series.items():
        for name, points in named.items():
            if name not in SITE_FIGURES:
                by_name.setdefault(name, {})[site] = points
    contracts = contract_results(source.artifact(run, CONTRACTS_ARTIFACT))
    excluded = excluded_sites(tags, contracts)
    sites = [s for s in params.get("sites", "").split(",") if s]
    rounds_record = source.artifact(run, ROUNDS_ARTIFACT)
    round_detail = isinstance(rounds_record, Mapping)
    if isinstance(rounds_record, Mapping):
        rows, rounds, more = participation_from_rounds(rounds_record, sites, excluded, site_series)
        notes += more
    else:
        steps = {step for points in counts.values() for step, _ in points}
        for named in site_series.values():
            for name in ("seconds", "num_examples"):
                steps |= {step for step, _ in named.get(name, [])}
        rounds = sorted(step for step in steps if step >= 1)
        rows = participation_from_metrics(site_series, sites, excluded, rounds)
        notes.append(
            f"The run has no {ROUNDS_ARTIFACT} (it crashed, or is still running): participation "
            "is rebuilt from the per-site metrics, and the per-round detail (who was selected, "
            "rejected or failed, and why) is missing."
        )
    versions = source.versions_of(run_id, run)
    ours = {(v.name, v.version) for v in versions}
    model_names = {v.name for v in versions} | (
        {tags[f"{TAG}model_name"]} if tags.get(f"{TAG}model_name") else set()
    )
    audit, more = source.audit_of(federation, model_names, ours) if model_names else ([], [])
    notes += more
    cost = cost_summary(source.artifact(run, COST_ARTIFACT))
    planned = params.get("rounds")
    for note in notes:
        log.info("report of run %s: %s", run_id, note)
    return RunReport(
        run_id=run_id,
        federation=federation,
        tenant=tags.get(f"{TAG}tenant") or params.get("tenant", "?"),
        status=run.info.status,
        mlflow_run_id=run.info.run_id,
        experiment=experiment.name if experiment else str(run.info.experiment_id),
        tracking=source.where,
        started_at=_when(run.info.start_time),
        finished_at=_when(run.info.end_time),
        config=config_facts(tags),
        mode=params.get("mode", "sync"),
        rounds_planned=int(planned) if planned and planned.isdigit() else None,
        lead_metric=params.get("evaluation.metric") or "accuracy",
        strategy=strategy_settings(params),
        privacy=privacy_settings(params, tags, metrics),
        final_metrics={
            k.removeprefix("final_"): v for k, v in metrics.items() if k.startswith("final_")
        },
        global_metrics=global_series,
        site_metrics=by_name,
        sites=list(dict.fromkeys([*sites, *(r.site for r in rows)])),
        rounds=rounds,
        participation=rows,
        round_detail=round_detail,
        site_totals=site_totals(rows, sites),
        contracts=contracts,
        versions=versions,
        audit=audit,
        cost=cost,
        notes=notes,
    )


def gather_tenant(settings: CoordinatorSettings, tenant: str) -> TenantReport:
    """Every training run of ``tenant`` across experiments (:class:`UnknownTenant` if none)."""
    source = ReportSource(settings)
    try:
        return _gather_tenant(source, tenant)
    except _mlflow_errors() as exc:
        raise ReportError(
            f"cannot read MLflow at {source.where}: {str(exc)[:300]}; check that the tracking "
            "server is up and MLFLOW_TRACKING_URI (or --state-dir) points at it"
        ) from exc


def _gather_tenant(source: ReportSource, tenant: str) -> TenantReport:
    runs = source.runs(f"tags.`{TAG}tenant` = '{tenant}'") if _TENANT.match(tenant) else []
    if not runs:
        known = source.known_tenants()
        raise UnknownTenant(
            f"no runs of tenant {tenant[:100]}; tenants under {source.where}: "
            f"{', '.join(known[:MAX_KNOWN]) or 'none'}"
        )
    rows = []
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        run_id = tags.get(f"{TAG}run_id", run.info.run_name or run.info.run_id)
        lead = params.get("evaluation.metric") or "accuracy"
        value = metrics.get(f"final_{lead}", metrics.get(lead))
        steps = source.histories(run, ["sites_accepted"] if "sites_accepted" in metrics else [])
        completed = len({step for points in steps.values() for step, _ in points})
        trained = {
            key.split(".")[1]
            for key in metrics
            if key.endswith(".num_examples") and key.startswith("site.")
        }
        planned = params.get("rounds")
        rows.append(
            TenantRun(
                run_id=run_id,
                federation=tags.get(f"{TAG}federation", "?"),
                mlflow_run_id=run.info.run_id,
                status=run.info.status,
                started_at=_when(run.info.start_time),
                rounds_completed=completed,
                rounds_planned=int(planned) if planned and planned.isdigit() else None,
                metric=lead,
                final_value=value if value is not None and math.isfinite(value) else None,
                sites_trained=len(trained),
                sites_listed=len([s for s in params.get("sites", "").split(",") if s]),
                versions=source.versions_of(run_id, run),
            )
        )
    return TenantReport(tenant=tenant, tracking=source.where, runs=rows)
