"""The lineage of a registered model version, for auditors: ``fedround lineage``.

Gathered from where each fact lives: the registry (version, semantic version, status,
digests), the MLflow run that trained it (config revision, sites, data-contract results,
per-round metrics, cost, privacy figures), the object store (checkpoints and their
digests, optionally re-verified) and the audit log (every promotion, rejection and
rollback of the version). Printed as text, or as JSON.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, Field

from fedround.tasks.audit import INTENT, AuditLog, pending_intents
from fedround.tasks.checkpoints import MANIFEST, load_checkpoint
from fedround.tasks.core import keys
from fedround.tasks.core.errors import CheckpointError, ObjectNotFound
from fedround.tasks.core.manifest import CheckpointManifest
from fedround.tasks.object_store import ObjectStore
from fedround.tasks.registry import TAG, ModelRegistry
from fedround.tasks.run_lineage import (
    CONTRACTS_ARTIFACT,
    COST_ARTIFACT,
    ROUNDS_ARTIFACT,
    load_run_json,
)

log = logging.getLogger(__name__)

NOT_RECORDED = "not recorded"


class Lineage(BaseModel):
    model: str
    version: str
    semver: str | None = None
    semver_change: str | None = None
    status: str | None = None
    aliases: list[str] = Field(default_factory=list)
    registered_at: str | None = None
    parent: str | None = None
    federation: str | None = None
    tenant: str | None = None
    run_id: str | None = None
    mlflow_run_id: str | None = None
    prefect_flow_run_id: str | None = None
    weights_sha256: str | None = None
    preprocessing_sha256: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    sites: dict[str, Any] = Field(default_factory=dict)
    contracts: dict[str, Any] | str = NOT_RECORDED
    rounds: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    privacy: dict[str, Any] | str = NOT_RECORDED
    checkpoints: list[dict[str, Any]] = Field(default_factory=list)
    promotions: list[dict[str, Any]] = Field(default_factory=list)
    cost: dict[str, Any] | str = NOT_RECORDED


def _artifact_json(run_id: str, path: str, tracking_uri: str) -> Any:
    return load_run_json(run_id, path, tracking_uri)


def _checkpoints(
    store: ObjectStore,
    federation: str,
    run_id: str,
    rounds: int,
    final_sha: str | None,
    verify: bool,
) -> list[dict[str, Any]]:
    present = keys.checkpoint_rounds(store.list(keys.checkpoints_prefix(federation, run_id)))
    rows = []
    for round_ in range(0, max([rounds, *present], default=0) + 1):
        prefix = keys.checkpoint_prefix(federation, run_id, round_)
        if round_ not in present:
            rows.append({"round": round_, "status": "pruned or never committed"})
            continue
        try:
            manifest = CheckpointManifest.from_json(store.get(prefix + MANIFEST))
        except (ObjectNotFound, ValueError) as exc:
            rows.append({"round": round_, "status": f"unreadable manifest: {exc}"})
            continue
        row: dict[str, Any] = {
            "round": round_,
            "status": "present",
            "uri": store.uri(prefix),
            "weights_sha256": manifest.weights_sha256,
            "created_at": manifest.created_at.isoformat(),
            "registered_weights": manifest.weights_sha256 == final_sha,
        }
        if verify:
            try:
                load_checkpoint(store, federation, run_id, round_)
                row["verified"] = True
            except CheckpointError as exc:
                row["verified"] = False
                row["error"] = str(exc)
        rows.append(row)
    return rows


def build_lineage(
    tracking_uri: str,
    store: ObjectStore,
    model: str,
    version: str,
    verify_checkpoints: bool = False,
) -> Lineage:
    """Everything recorded about ``model`` version ``version``."""
    registry = ModelRegistry(tracking_uri, model)
    entry = registry.resolve(version)
    version = str(entry.version)
    tags = dict(entry.tags)
    aliases = sorted(a for a, v in registry.aliases().items() if v == version)
    lineage = Lineage(
        model=model,
        version=version,
        semver=tags.get(f"{TAG}semver"),
        semver_change=tags.get(f"{TAG}semver_reason") or tags.get(f"{TAG}semver_change"),
        status=tags.get(f"{TAG}status"),
        aliases=aliases,
        parent=tags.get(f"{TAG}parent_version"),
        federation=tags.get(f"{TAG}federation"),
        tenant=tags.get(f"{TAG}tenant"),
        run_id=tags.get(f"{TAG}run_id"),
        mlflow_run_id=entry.run_id,
        weights_sha256=tags.get(f"{TAG}weights_sha256"),
        preprocessing_sha256=tags.get(f"{TAG}preprocessing_sha256"),
    )
    if entry.creation_timestamp:
        from datetime import UTC, datetime

        lineage.registered_at = datetime.fromtimestamp(
            entry.creation_timestamp / 1000, UTC
        ).isoformat(timespec="seconds")
    run_id: str = entry.run_id or ""
    run = registry.client.get_run(run_id) if run_id else None
    run_tags = dict(run.data.tags) if run else {}
    lineage.prefect_flow_run_id = run_tags.get(f"{TAG}prefect_flow_run_id")
    lineage.config = {
        key.removeprefix(TAG): value
        for key, value in {**run_tags, **tags}.items()
        if key.startswith((f"{TAG}config_", f"{TAG}contract_", f"{TAG}allow_dirty"))
    }
    excluded = json.loads(run_tags.get(f"{TAG}excluded_sites", "{}"))
    participating = [s for s in tags.get(f"{TAG}sites", "").split(",") if s]
    rounds_detail = _artifact_json(run_id, ROUNDS_ARTIFACT, tracking_uri) if run else None
    left_out = {
        r: {**row.get("left_out", {}), **row.get("failed", {}), **row.get("rejected", {})}
        for r, row in (rounds_detail or {}).items()
        if row.get("left_out") or row.get("failed") or row.get("rejected")
    }
    lineage.sites = {
        "participating": participating,
        "excluded": excluded,
        "left_out_in_rounds": left_out,
        # reputation: sites whose updates were repeatedly clipped, rejected or discarded
        "flagged": json.loads(run_tags.get(f"{TAG}flagged_sites", "{}")),
    }
    if run:
        contracts = _artifact_json(run_id, CONTRACTS_ARTIFACT, tracking_uri)
        if contracts is not None:
            lineage.contracts = contracts
        cost = _artifact_json(run_id, COST_ARTIFACT, tracking_uri)
        if cost is not None:
            lineage.cost = cost
        metrics = dict(run.data.metrics)
        lineage.metrics = {k: v for k, v in metrics.items() if k.startswith("final_")}
        lead = run.data.params.get("evaluation.metric")  # the federation's own metric
        history = {
            name: {
                m.step: m.value for m in registry.client.get_metric_history(run.info.run_id, name)
            }
            for name in dict.fromkeys(
                ["accuracy", "loss", *([lead] if lead else []), "sites_accepted"]
            )
            if name in metrics
        }
        steps = sorted({step for series in history.values() for step in series})
        lineage.rounds = {
            "planned": int(run.data.params.get("rounds", tags.get(f"{TAG}rounds", "0"))),
            "completed": len(steps),
            "resumed": run_tags.get(f"{TAG}resumed") == "true",
            "history": [
                {"round": step, **{name: series.get(step) for name, series in history.items()}}
                for step in steps
            ],
        }
        privacy = {
            **{
                k.removeprefix(TAG): v
                for k, v in {**run_tags, **tags}.items()  # the version's own tags last
                if k.startswith(f"{TAG}privacy")
            },
            **{k: v for k, v in metrics.items() if k.startswith(("privacy", "dp_", "dp."))},
        }
        if privacy:
            lineage.privacy = privacy
    if lineage.federation and lineage.run_id:
        lineage.checkpoints = _checkpoints(
            store,
            lineage.federation,
            lineage.run_id,
            int(lineage.rounds.get("planned") or tags.get(f"{TAG}rounds", 0) or 0),
            lineage.weights_sha256,
            verify_checkpoints,
        )
        entries = AuditLog(store, lineage.federation).entries(model=model)
        half_done = {e.sequence for e in pending_intents(entries)}  # completed ones: noise
        lineage.promotions = [
            e.model_dump(mode="json")
            for e in entries
            if (e.version == version or e.previous_production == version)
            and (e.action != INTENT or e.sequence in half_done)
        ]
    return lineage


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render_text(lineage: Lineage) -> str:
    """The lineage as a readable report."""
    out: list[str] = []
    add = out.append
    head = f"{lineage.model} version {lineage.version}"
    if lineage.semver:
        head += f" ({lineage.semver})"
    add(head)
    add(
        f"  status         {lineage.status or '?'}; aliases: {', '.join(lineage.aliases) or 'none'}"
    )
    add(f"  semver change  {lineage.semver_change or NOT_RECORDED}")
    if lineage.parent:
        add(f"  fine-tuned from version {lineage.parent}")
    add(f"  registered     {lineage.registered_at or '?'}")
    add(f"  federation     {lineage.federation} (tenant {lineage.tenant})")
    add(
        f"  training run   {lineage.run_id} (MLflow run {lineage.mlflow_run_id}, "
        f"Prefect flow run {lineage.prefect_flow_run_id})"
    )
    add(f"  weights        sha256 {lineage.weights_sha256}")
    if lineage.preprocessing_sha256:
        add(f"  preprocessing  sha256 {lineage.preprocessing_sha256}")
    add("")
    add("Config revision")
    config = lineage.config
    add(f"  revision       {config.get('config_revision', NOT_RECORDED)}")
    add(
        f"  tracked by     {config.get('config_tracked_by', '?')}; "
        f"dirty: {config.get('config_dirty', '?')}"
    )
    for key, label in (
        ("config_git_commit", "git commit"),
        ("config_git_remote", "git remote"),
        ("config_dvc_md5", "DVC md5 (config)"),
        ("contract_dvc_md5", "DVC md5 (suite)"),
        ("config_dvc_url", "DVC remote URL"),
        ("config_sha256", "sha256 (config)"),
        ("contract_sha256", "sha256 (suite)"),
        ("config_dirty_reasons", "dirty because"),
    ):
        if config.get(key):
            add(f"  {label:<17}{config[key]}")
    add("")
    add("Sites")
    sites = lineage.sites
    add(f"  participating  {', '.join(sites.get('participating', [])) or 'none recorded'}")
    for site, why in sorted(sites.get("excluded", {}).items()):
        add(f"  excluded       {site}: {why}")
    for site, record in sorted(sites.get("flagged", {}).items()):
        add(
            f"  flagged        {site}: {record.get('strikes')} of its last "
            f"{record.get('updates')} updates clipped, rejected or discarded"
            + ("; past the threshold, left out" if record.get("past_threshold") else "")
        )
    for round_, left in sorted(
        sites.get("left_out_in_rounds", {}).items(), key=lambda kv: int(kv[0])
    ):
        for site, why in sorted(left.items()):
            add(f"  left out       round {round_}: {site}: {why}")
    add("")
    add("Data contracts")
    if isinstance(lineage.contracts, str):
        add(f"  {lineage.contracts}")
    else:
        for site, result in sorted(lineage.contracts.items()):
            add(
                f"  {site:<14} {'pass' if result.get('success') else 'FAIL'}: "
                f"{result.get('summary')}"
            )
    add("")
    rounds = lineage.rounds
    add(
        f"Rounds: {rounds.get('completed', '?')} of {rounds.get('planned', '?')}"
        + (" (resumed after a crash)" if rounds.get("resumed") else "")
    )
    for row in rounds.get("history", []):
        figures = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in row.items()
            if k != "round" and v is not None
        )
        add(f"  round {row['round']:>3}  {figures}")
    add("Metrics")
    for key, value in sorted(lineage.metrics.items()):
        add(f"  {key:<15}{value:.4f}")
    add("Privacy budget")
    if isinstance(lineage.privacy, str):
        add(f"  {lineage.privacy} (no differential privacy in this run)")
    else:
        for key, value in sorted(lineage.privacy.items()):
            add(f"  {key}: {value}")
    add("")
    add("Checkpoints")
    for row in lineage.checkpoints:
        if row["status"] != "present":
            add(f"  round {row['round']:>4}  {row['status']}")
            continue
        mark = "  ← the registered weights" if row.get("registered_weights") else ""
        verified = (
            {True: " verified", False: " FAILS VERIFICATION"}.get(bool(row["verified"]), "")
            if "verified" in row
            else ""
        )
        add(f"  round {row['round']:>4}  sha256 {row['weights_sha256']}{verified}{mark}")
        if row.get("error"):
            add(f"              {row['error']}")
    add("")
    add("Promotion history")
    if not lineage.promotions:
        add("  none")
    for entry in lineage.promotions:
        add(
            f"  #{entry['sequence']} {entry['at']} {entry['action']} v{entry['version']} "
            f"by {entry['actor']}: {entry['reason']}"
        )
    add("")
    add("Cost")
    if isinstance(lineage.cost, str):
        add(f"  {lineage.cost}")
    else:
        total = lineage.cost.get("tenant_total", {})
        add(
            f"  tenant {lineage.cost.get('tenant')}: "
            f"{total.get('compute_seconds', 0):.1f} compute-s, "
            f"{_bytes(total.get('bytes_up', 0))} up, {_bytes(total.get('bytes_down', 0))} down; "
            f"coordinator {lineage.cost.get('coordinator_seconds', 0):.1f} s"
        )
        for site, cost in lineage.cost.get("sites", {}).items():
            add(
                f"  {site:<14} {cost['compute_seconds']:.1f} compute-s "
                f"over {cost['rounds']} rounds, "
                f"{_bytes(cost['bytes_up'])} up, {_bytes(cost['bytes_down'])} down"
            )
    return "\n".join(out)
